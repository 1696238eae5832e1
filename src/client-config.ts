/**
 * What a Nix user pastes to use the box: the NixOS module settings, the `nix.conf` `builders` line, a machines-file
 * line and an `~/.ssh/config` stanza, all made from one description of the box (`BoxInfo`) and of the user's side
 * (user name, key file, protocol).
 *
 * `BoxInfo` is also what the box answers to the exec command `buildbox-info` (src/session.ts), so that
 * `client-config --host` and `doctor` can learn a remote box's systems and features over SSH.
 *
 * Port handling: Nix's ssh:// and ssh-ng:// URIs carry no port that every client understands, and Nix pins the host
 * key from the machines line by writing `<host> <key>` into a temporary known_hosts file. So for a box on a port
 * other than 22 the ssh stanza (`Host <host>` with `Port` and `HostKeyAlias <host>`) is part of the setup: with it,
 * ssh connects to the right port and looks the host key up under the plain host name.
 */
import { isValidUserName } from './registry.js';
import { VERSION } from './version.js';

export const BOX_INFO_COMMAND = 'buildbox-info';

export interface BoxInfo {
  'buildbox-info': 1;
  version: string;
  hostName: string;
  /** Systems the box builds for (its system first, then extra platforms). */
  systems: string[];
  /** Build slots of the whole box. */
  maxJobs: number;
  /** The asking user's own limit, when the registry sets one. */
  userJobs?: number;
  supportedFeatures: string[];
  mandatoryFeatures: string[];
  /** `ssh-ed25519 AAAA…` */
  hostKey: string;
  /** `SHA256:…` */
  fingerprint: string;
  /** The box's signing public key (`buildbox-<host>-1:…`), for clients that want its public outputs. */
  signingKey: string | null;
  /** Registry user the answer was made for. */
  user?: string;
}

export interface BoxFacts {
  hostName: string;
  systems: string[];
  maxJobs: number;
  supportedFeatures: string[];
  mandatoryFeatures: string[];
  hostKey: { publicKey: string; fingerprint: string };
  signingKey?: { toString(): string } | null;
}

export function boxInfo(facts: BoxFacts, user?: string, userJobs?: number): BoxInfo {
  const info: BoxInfo = {
    'buildbox-info': 1,
    version: VERSION,
    hostName: facts.hostName,
    systems: [...facts.systems],
    maxJobs: facts.maxJobs,
    supportedFeatures: [...facts.supportedFeatures],
    mandatoryFeatures: [...facts.mandatoryFeatures],
    hostKey: facts.hostKey.publicKey,
    fingerprint: facts.hostKey.fingerprint,
    signingKey: facts.signingKey ? facts.signingKey.toString() : null,
  };
  if (user !== undefined) info.user = user;
  if (userJobs !== undefined) info.userJobs = userJobs;
  return info;
}

export class BoxInfoError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BoxInfoError';
  }
}

const TOKEN_RE = /^[A-Za-z0-9_.+-]{1,100}$/;

/** Parse and check the JSON a box answered to `buildbox-info`. */
export function parseBoxInfo(text: string): BoxInfo {
  let o: Record<string, unknown>;
  try {
    o = JSON.parse(text.trim()) as Record<string, unknown>;
  } catch {
    throw new BoxInfoError(`the box's answer to ${BOX_INFO_COMMAND} is not JSON: ${JSON.stringify(text.slice(0, 80))}`);
  }
  if (typeof o !== 'object' || o === null || o['buildbox-info'] !== 1) {
    throw new BoxInfoError(`the box's answer to ${BOX_INFO_COMMAND} is not a buildbox-info version 1 object`);
  }
  const tokens = (k: string): string[] => {
    const v = o[k];
    if (!Array.isArray(v) || v.some((x) => typeof x !== 'string' || !TOKEN_RE.test(x))) {
      throw new BoxInfoError(`bad ${k} in the box's ${BOX_INFO_COMMAND} answer`);
    }
    return v as string[];
  };
  const str = (k: string): string => {
    const v = o[k];
    if (typeof v !== 'string' || v.length > 4096)
      throw new BoxInfoError(`bad ${k} in the box's ${BOX_INFO_COMMAND} answer`);
    return v;
  };
  const int = (k: string): number => {
    const v = o[k];
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 0) {
      throw new BoxInfoError(`bad ${k} in the box's ${BOX_INFO_COMMAND} answer`);
    }
    return v;
  };
  const info: BoxInfo = {
    'buildbox-info': 1,
    version: str('version'),
    hostName: str('hostName'),
    systems: tokens('systems'),
    maxJobs: int('maxJobs'),
    supportedFeatures: tokens('supportedFeatures'),
    mandatoryFeatures: tokens('mandatoryFeatures'),
    hostKey: str('hostKey'),
    fingerprint: str('fingerprint'),
    signingKey: o.signingKey === null || o.signingKey === undefined ? null : str('signingKey'),
  };
  if (!/^[a-z0-9-]+(@openssh\.com)? [A-Za-z0-9+/]+=*$/.test(info.hostKey)) {
    throw new BoxInfoError(`bad hostKey in the box's ${BOX_INFO_COMMAND} answer`);
  }
  if (o.user !== undefined) info.user = str('user');
  if (o.userJobs !== undefined) info.userJobs = int('userJobs');
  return info;
}

export type Protocol = 'ssh' | 'ssh-ng';
export type Format = 'nixos' | 'nix-conf' | 'machines' | 'ssh-config';
export const FORMATS: readonly Format[] = ['nixos', 'nix-conf', 'machines', 'ssh-config'];

export interface ClientSetup {
  /** Registry user name = SSH user. */
  user: string;
  /** Host name clients connect to. */
  host: string;
  port: number;
  /** Private key file on the client (read by root when the nix-daemon builds). */
  sshKey: string;
  protocol: Protocol;
  speedFactor: number;
  /** ControlPath for the ssh stanza. */
  controlPath: string;
  info: BoxInfo;
}

export const DEFAULT_SSH_KEY = '/root/.ssh/id_buildbox';
export const DEFAULT_CONTROL_PATH = '~/.ssh/buildbox-%C';

export class ClientConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ClientConfigError';
  }
}

const HOST_RE =
  /^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?|\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]+)$/;

export function checkSetup(s: ClientSetup): void {
  if (!isValidUserName(s.user)) throw new ClientConfigError(`invalid user name ${JSON.stringify(s.user)}`);
  if (!HOST_RE.test(s.host)) throw new ClientConfigError(`invalid host name ${JSON.stringify(s.host)}`);
  if (!Number.isInteger(s.port) || s.port < 1 || s.port > 65535) throw new ClientConfigError(`invalid port ${s.port}`);
  if (/[\s"'\\]/.test(s.sshKey) || s.sshKey === '') {
    throw new ClientConfigError(`key path ${JSON.stringify(s.sshKey)} must not be empty or contain spaces or quotes`);
  }
  if (!(s.speedFactor > 0)) throw new ClientConfigError(`speed factor must be positive, got ${s.speedFactor}`);
  if (s.info.systems.length === 0) throw new ClientConfigError('the box reports no systems');
}

/** The host part Nix sees (bare IPv6 addresses in brackets are not accepted by ssh as a host; strip them). */
function sshHost(host: string): string {
  return host.startsWith('[') && host.endsWith(']') ? host.slice(1, -1) : host;
}

export function storeUri(s: ClientSetup): string {
  return `${s.protocol}://${s.user}@${sshHost(s.host)}`;
}

/** The host key as the machines file's 8th field wants it: base64 of the whole `ssh-ed25519 AAAA…` line. */
export function base64HostKey(publicKey: string): string {
  return Buffer.from(publicKey.trim()).toString('base64');
}

function jobsOf(s: ClientSetup): number {
  const j = s.info.userJobs !== undefined ? Math.min(s.info.userJobs, s.info.maxJobs) : s.info.maxJobs;
  return Math.max(1, j);
}

function list(xs: string[]): string {
  return xs.length === 0 ? '-' : xs.join(',');
}

/** One machines-file line: URI, systems, key, maxJobs, speedFactor, supported, mandatory, base64 host key. */
export function machinesLine(s: ClientSetup): string {
  checkSetup(s);
  return [
    storeUri(s),
    list(s.info.systems),
    s.sshKey,
    String(jobsOf(s)),
    String(s.speedFactor),
    list(s.info.supportedFeatures),
    list(s.info.mandatoryFeatures),
    base64HostKey(s.info.hostKey),
  ].join(' ');
}

export function nixConfLine(s: ClientSetup): string {
  return `builders = ${machinesLine(s)}`;
}

export interface MachineEntry {
  uri: string;
  protocol: Protocol | 'other';
  user: string | null;
  host: string;
  systems: string[];
  sshKey: string | null;
  maxJobs: number;
  speedFactor: number;
  supportedFeatures: string[];
  mandatoryFeatures: string[];
  /** Decoded host key line (`ssh-ed25519 AAAA…`), when given. */
  publicHostKey: string | null;
}

/**
 * Parse machines-file text (or a `builders` value: entries separated by newlines or `;`) the way Nix does: `#`
 * comments, whitespace-separated fields, `-` or missing fields meaning "default".
 */
export function parseMachines(text: string): MachineEntry[] {
  const out: MachineEntry[] = [];
  for (const raw of text.split(/[\n;]/)) {
    const line = raw.replace(/#.*$/, '').trim();
    if (line === '') continue;
    const f = line.split(/\s+/);
    const field = (i: number): string | null => (f[i] === undefined || f[i] === '-' || f[i] === '' ? null : f[i]!);
    const uri = f[0]!;
    const m = /^(ssh-ng|ssh):\/\/(?:([^@/]+)@)?([^/?]+)/.exec(uri);
    const bare = /^(?:([^@/:]+)@)?([^/:?]+)$/.exec(uri); // Nix also accepts `user@host` (meaning ssh://)
    const numberField = (i: number, def: number): number => {
      const v = field(i);
      if (v === null) return def;
      const n = Number(v);
      if (!Number.isFinite(n)) throw new ClientConfigError(`machines line "${line}": field ${i + 1} is not a number`);
      return n;
    };
    const hk = field(7);
    out.push({
      uri,
      protocol: m ? (m[1] as Protocol) : bare ? 'ssh' : 'other',
      user: m ? (m[2] ?? null) : bare ? (bare[1] ?? null) : null,
      host: m ? m[3]! : bare ? bare[2]! : uri,
      systems: field(1)?.split(',') ?? [],
      sshKey: field(2),
      maxJobs: numberField(3, 1),
      speedFactor: numberField(4, 1),
      supportedFeatures: field(5)?.split(',') ?? [],
      mandatoryFeatures: field(6)?.split(',') ?? [],
      publicHostKey: hk === null ? null : Buffer.from(hk, 'base64').toString('utf8').trim(),
    });
  }
  return out;
}

export function sshConfigStanza(s: ClientSetup, indent = ''): string {
  checkSetup(s);
  const host = sshHost(s.host);
  const lines = [
    `Host ${host}`,
    `  HostName ${host}`,
    `  Port ${s.port}`,
    `  User ${s.user}`,
    `  IdentityFile ${s.sshKey}`,
    '  IdentitiesOnly yes',
    // With a non-standard port ssh would look the key up as [host]:port; the alias keeps it under the plain name,
    // which is what Nix writes for the machines line's host key and what known_hosts below uses.
    `  HostKeyAlias ${host}`,
    // One authenticated connection reused for the builds that follow: a FIDO key is touched once, not per build.
    '  ControlMaster auto',
    `  ControlPath ${s.controlPath}`,
    '  ControlPersist 10m',
    '  ServerAliveInterval 30',
  ];
  return `${lines.map((l) => indent + l).join('\n')}\n`;
}

function nixString(s: string): string {
  return `"${s.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\$\{/g, '\\${')}"`;
}

function nixList(xs: string[]): string {
  return xs.length === 0 ? '[ ]' : `[ ${xs.map(nixString).join(' ')} ]`;
}

export function nixosSnippet(s: ClientSetup): string {
  checkSetup(s);
  const host = sshHost(s.host);
  const hostNames = s.port === 22 ? [host] : [host, `[${host}]:${s.port}`];
  const extra = sshConfigStanza(s, '    ').replace(/''/g, "'''").replace(/\$\{/g, "''${");
  return [
    '{',
    `  # buildbox ${s.info.hostName}: the host key root's ssh accepts for it (${s.info.fingerprint})`,
    `  programs.ssh.knownHosts.${nixString(`buildbox-${host}`)} = {`,
    `    hostNames = ${nixList(hostNames)};`,
    `    publicKey = ${nixString(s.info.hostKey)};`,
    '  };',
    "  programs.ssh.extraConfig = ''",
    extra.trimEnd(),
    "  '';",
    '  nix.distributedBuilds = true;',
    '  nix.buildMachines = [',
    '    {',
    `      hostName = ${nixString(host)};`,
    `      protocol = ${nixString(s.protocol)};`,
    `      systems = ${nixList(s.info.systems)};`,
    `      maxJobs = ${jobsOf(s)};`,
    `      speedFactor = ${s.speedFactor};`,
    `      supportedFeatures = ${nixList(s.info.supportedFeatures)};`,
    `      mandatoryFeatures = ${nixList(s.info.mandatoryFeatures)};`,
    `      sshUser = ${nixString(s.user)};`,
    `      sshKey = ${nixString(s.sshKey)};`,
    `      publicHostKey = ${nixString(base64HostKey(s.info.hostKey))};`,
    '    }',
    '  ];',
    '}',
    '',
  ].join('\n');
}

/** One format, or all four with a line of explanation each. */
export function renderClientConfig(s: ClientSetup, format?: Format): string {
  checkSetup(s);
  switch (format) {
    case 'nixos':
      return nixosSnippet(s);
    case 'nix-conf':
      return `${nixConfLine(s)}\n`;
    case 'machines':
      return `${machinesLine(s)}\n`;
    case 'ssh-config':
      return sshConfigStanza(s);
    case undefined:
      break;
  }
  const portNote =
    s.port === 22
      ? ''
      : `#   The box listens on port ${s.port}: the ssh stanza (4.) must be in root's ssh config for 2. and 3. to work.\n`;
  return [
    `# Client configuration for ${s.user} on buildbox ${s.info.hostName} (${s.host}, port ${s.port}).`,
    `# Host key fingerprint: ${s.info.fingerprint} — compare it with what the box's admin publishes.`,
    `# ${s.sshKey} must be the private key whose .pub is in the registry (keys/${s.user}), without a passphrase,`,
    '# readable by root: the nix-daemon connects as root. Check everything with:',
    `#   sudo buildbox doctor ${s.protocol}://${s.user}@${sshHost(s.host)}${s.port === 22 ? '' : `:${s.port}`} --key ${s.sshKey} --expect-fingerprint ${s.info.fingerprint}`,
    '',
    '# 1. NixOS: add to configuration.nix (host key, ssh settings, the box as a build machine), then nixos-rebuild switch.',
    nixosSnippet(s),
    '# 2. Other Linux: this line in /etc/nix/nix.conf, then restart the nix-daemon.',
    portNote + nixConfLine(s),
    '',
    '# 3. The same as a machines-file line (e.g. /etc/nix/machines, with builders = @/etc/nix/machines); the last',
    '#    field pins the host key, so no known_hosts entry is needed.',
    machinesLine(s),
    '',
    "# 4. ~/.ssh/config of whoever runs the builds (root's /root/.ssh/config for the nix-daemon): port, key, and one",
    '#    reused connection (ControlMaster) so that a FIDO key is not touched for every build.',
    sshConfigStanza(s).trimEnd(),
    '',
  ].join('\n');
}
