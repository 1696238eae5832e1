/**
 * Commands for joining the box and for its OpenSSH front door:
 *
 * - `buildbox client-config --user NAME` — ready-to-paste client settings (NixOS, nix.conf, machines line, ssh).
 * - `buildbox doctor USER@HOST[:PORT]` — check a client's setup against the box, one line per check.
 * - `buildbox authorized-keys USER` — sshd's AuthorizedKeysCommand: the user's registry keys, forced to `session`.
 * - `buildbox session USER` — sshd's forced command: the session, through the running box's unix socket.
 */
import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { join } from 'node:path';
import type { Command } from 'commander';
import type { AuthorizedKey, KeyOption } from '../authorized-keys.js';
import { UsageError } from '../cli.js';
import {
  type BoxInfo,
  boxInfo,
  type ClientSetup,
  DEFAULT_CONTROL_PATH,
  DEFAULT_SSH_KEY,
  FORMATS,
  type Format,
  type Protocol,
  renderClientConfig,
} from '../client-config.js';
import { type Config, loadConfig, systemsOf } from '../config.js';
import { fetchRemoteBoxInfo, formatReport, runDoctor } from '../doctor.js';
import { fingerprintOfBlob, HOST_KEY_FILE, publicKeyBlob } from '../host-key.js';
import { isValidUserName, loadRegistry } from '../registry.js';
import { runSessionClient, SESSION_SOCKET_FILE } from '../session-socket.js';
import { loadPublicKey } from '../signing.js';

interface BoxOpts {
  config?: string;
  stateDir?: string;
}

function boxConfig(opts: BoxOpts): Config {
  const c = loadConfig(opts.config ?? null);
  if (opts.stateDir) c.stateDir = opts.stateDir.startsWith('/') ? opts.stateDir : join(process.cwd(), opts.stateDir);
  return c;
}

/** Where the box's registry is on disk: the directory, or the applied checkout of a followed git repository. */
export function registryDir(c: Config): string {
  return c.registry.git ? join(c.stateDir, 'registry-git', 'current') : c.registry.path;
}

function shellQuote(s: string): string {
  return /^[A-Za-z0-9_./:@%+=,-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Options of a registry key that still make sense (and only restrict further) behind `restrict,command=…`. */
const KEPT_OPTIONS = new Set([
  'cert-authority',
  'principals',
  'from',
  'expiry-time',
  'verify-required',
  'no-touch-required',
]);

function renderOption(o: KeyOption): string {
  return o.value === undefined ? o.name : `${o.name}="${o.value.replace(/"/g, '\\"')}"`;
}

/**
 * One authorized_keys line for sshd: `restrict,command="…"` first, then the registry line's own options that keep
 * their meaning (cert-authority with its principals, from=, expiry-time=, FIDO touch/verify flags), then the key.
 */
export function forcedKeyLine(key: AuthorizedKey, command: string): string {
  if (/["\n\r]/.test(command)) throw new UsageError('the forced command must not contain double quotes or newlines');
  const opts = [
    'restrict',
    `command="${command}"`,
    ...key.options.filter((o) => KEPT_OPTIONS.has(o.name)).map(renderOption),
  ];
  return `${opts.join(',')} ${key.type} ${key.blob.toString('base64')} buildbox:${key.fingerprint}`;
}

/** The program sshd should run: this very buildbox (node + script), unless told otherwise. */
function selfProgram(): string {
  const script = process.argv[1] ? realpathSync(process.argv[1]) : '';
  return `${shellQuote(process.execPath)} ${shellQuote(script)}`;
}

export function sessionCommand(program: string, socket: string, user: string): string {
  return `${program} session --socket ${shellQuote(socket)} ${shellQuote(user)}`;
}

/** The fingerprint sshd exposes for the key that authenticated this session (`ExposeAuthInfo yes`). */
function authFingerprint(): string | undefined {
  const file = process.env.SSH_USER_AUTH;
  if (!file) return undefined;
  try {
    const lines = readFileSync(file, 'utf8')
      .split('\n')
      .filter((l) => l.startsWith('publickey '));
    const last = lines[lines.length - 1];
    if (!last) return undefined;
    const [, type, b64] = last.trim().split(/\s+/);
    return b64
      ? `${fingerprintOfBlob(Buffer.from(b64, 'base64'))}${type?.includes('-cert-') ? ' (certificate)' : ''}`
      : undefined;
  } catch {
    return undefined;
  }
}

function parsePort(v: string | undefined, what = '--port'): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 65535) throw new UsageError(`${what} must be a port number, got '${v}'`);
  return n;
}

function localBoxInfo(c: Config, hostKeyFile: string | undefined, user: string, userJobs?: number): BoxInfo {
  const pubFile = hostKeyFile ?? join(c.stateDir, `${HOST_KEY_FILE}.pub`);
  const publicKey = readFileSync(pubFile, 'utf8').trim().split(/\s+/).slice(0, 2).join(' ');
  const signingFile = join(c.stateDir, 'signing-key.pub');
  return boxInfo(
    {
      hostName: c.hostName,
      systems: systemsOf(c),
      maxJobs: c.maxJobs,
      supportedFeatures: c.supportedFeatures,
      mandatoryFeatures: c.mandatoryFeatures,
      hostKey: { publicKey, fingerprint: fingerprintOfBlob(publicKeyBlob(publicKey)) },
      signingKey: existsSync(signingFile) ? loadPublicKey(signingFile) : null,
    },
    user,
    userJobs,
  );
}

export function registerClientCommands(program: Command): void {
  program
    .command('client-config')
    .description('print ready-to-paste client settings for a user of this box (NixOS, nix.conf, machines line, ssh)')
    .requiredOption('--user <name>', "the user's registry name (also the SSH user)")
    .option('--host <host>', 'host name clients connect to (default: the config host-name)')
    .option('-p, --port <port>', 'SSH port clients connect to (default: the config port)')
    .option('--format <format>', `only one of: ${FORMATS.join(', ')}`)
    .option('--key <file>', `private key file on the client, read by root (default ${DEFAULT_SSH_KEY})`)
    .option('--protocol <protocol>', 'ssh-ng (nix-daemon --stdio) or ssh (nix-store --serve)', 'ssh-ng')
    .option('--speed-factor <n>', 'speedFactor of the box in the machines line', '1')
    .option('--control-path <path>', 'ControlPath of the ssh stanza', DEFAULT_CONTROL_PATH)
    .option(
      '--host-key <file>',
      "public host key file clients see (a box behind OpenSSH: sshd's, e.g. /etc/ssh/ssh_host_ed25519_key.pub)",
    )
    .option('--remote', 'ask the box at --host over SSH even when a local state directory exists')
    .option('--expect-fingerprint <fp>', 'remote mode: the host key fingerprint the box must present')
    .option('--ssh-config <file>', 'remote mode: ssh config file (ssh -F)')
    .option('-c, --config <file>', 'the box config (TOML) when run on the box')
    .option('--state-dir <dir>', 'the box state directory when run on the box')
    .action(
      async (
        opts: BoxOpts & {
          user: string;
          host?: string;
          port?: string;
          format?: string;
          key?: string;
          protocol: string;
          speedFactor: string;
          controlPath: string;
          hostKey?: string;
          remote?: boolean;
          expectFingerprint?: string;
          sshConfig?: string;
        },
      ) => {
        if (!isValidUserName(opts.user)) throw new UsageError(`invalid user name '${opts.user}'`);
        if (opts.format !== undefined && !FORMATS.includes(opts.format as Format)) {
          throw new UsageError(`--format must be one of ${FORMATS.join(', ')}, got '${opts.format}'`);
        }
        if (opts.protocol !== 'ssh' && opts.protocol !== 'ssh-ng') {
          throw new UsageError(`--protocol must be ssh or ssh-ng, got '${opts.protocol}'`);
        }
        const speedFactor = Number(opts.speedFactor);
        if (!Number.isInteger(speedFactor) || speedFactor < 1) {
          throw new UsageError(
            `--speed-factor must be a positive integer (Nix 2.8 reads no fractions), got '${opts.speedFactor}'`,
          );
        }
        const c = boxConfig(opts);
        const port = parsePort(opts.port);
        const local = !opts.remote && existsSync(opts.hostKey ?? join(c.stateDir, `${HOST_KEY_FILE}.pub`));
        let info: BoxInfo;
        let host: string;
        let boxPort: number;
        if (local) {
          host = opts.host ?? c.hostName;
          boxPort = port ?? c.port;
          let userJobs: number | undefined;
          try {
            const reg = await loadRegistry(registryDir(c));
            const u = reg.users.get(opts.user);
            if (!u) {
              process.stderr.write(
                `buildbox: warning: ${opts.user} is not in the registry at ${registryDir(c)} (yet): the box will refuse them until added\n`,
              );
            } else userJobs = u.jobs;
          } catch (e) {
            process.stderr.write(`buildbox: warning: cannot read the registry: ${(e as Error).message}\n`);
          }
          info = localBoxInfo(c, opts.hostKey, opts.user, userJobs);
          if (!opts.host) {
            process.stderr.write(
              `buildbox: note: using host name '${host}' (the config's host-name); pass --host with the name clients use\n`,
            );
          }
        } else {
          if (!opts.host) {
            throw new UsageError(
              `no box state in ${c.stateDir}: run this on the box (with -c/--state-dir), or pass --host to ask a remote box`,
            );
          }
          host = opts.host;
          boxPort = port ?? 22;
          const remote = await fetchRemoteBoxInfo({
            host,
            port: boxPort,
            user: opts.user,
            key: opts.key && existsSync(opts.key) ? opts.key : undefined,
            expectFingerprint: opts.expectFingerprint,
            sshConfig: opts.sshConfig,
          });
          info = remote.info;
          if (!opts.expectFingerprint) {
            process.stderr.write(
              `buildbox: note: the host key ${info.fingerprint} was read over the network (ssh-keyscan); ` +
                'compare it with the fingerprint the box admin publishes before trusting it\n',
            );
          }
        }
        const setup: ClientSetup = {
          user: opts.user,
          host,
          port: boxPort,
          sshKey: opts.key ?? DEFAULT_SSH_KEY,
          protocol: opts.protocol as Protocol,
          speedFactor,
          controlPath: opts.controlPath,
          info,
        };
        process.stdout.write(renderClientConfig(setup, opts.format as Format | undefined));
      },
    );

  program
    .command('doctor')
    .description("check this machine's setup for the box, one line per check, with the fix for each failure")
    .argument('<target>', '[ssh://|ssh-ng://]USER@HOST[:PORT]')
    .option('--key <file>', 'private key the nix-daemon uses for the box (default: what ssh would use)')
    .option('--expect-fingerprint <fp>', 'SHA256:… fingerprint the box must present (from its admin)')
    .option('--known-hosts <file...>', "known_hosts files to check (default: those root's ssh reads)")
    .option('--ssh-config <file>', 'ssh config file (ssh -F)')
    .option('--require-features <list>', 'comma-separated features your builds need from the box')
    .option('--builders <spec>', "a builders value or @file to compare with (default: the local Nix's)")
    .option('--json', 'machine-readable report')
    .action(
      async (
        target: string,
        opts: {
          key?: string;
          expectFingerprint?: string;
          knownHosts?: string[];
          sshConfig?: string;
          requireFeatures?: string;
          builders?: string;
          json?: boolean;
        },
      ) => {
        const report = await runDoctor({
          target,
          key: opts.key,
          expectFingerprint: opts.expectFingerprint,
          knownHosts: opts.knownHosts,
          sshConfig: opts.sshConfig,
          requireFeatures: opts.requireFeatures?.split(',').filter((x) => x !== ''),
          builders: opts.builders,
        }).catch((e: Error) => {
          throw new UsageError(e.message);
        });
        process.stdout.write(opts.json ? `${JSON.stringify(report, null, 2)}\n` : formatReport(report));
        process.exitCode = report.exitCode;
      },
    );

  program
    .command('authorized-keys')
    .description("for sshd's AuthorizedKeysCommand: USER's registry keys, each forced to `buildbox session USER`")
    .argument('<user>', 'the user sshd is authenticating (%u)')
    .option('-c, --config <file>', 'the box config (TOML): registry and state directory')
    .option('--state-dir <dir>', 'the box state directory')
    .option('--registry <dir>', 'registry directory (default: from the config)')
    .option('--socket <path>', 'session socket (default: <state-dir>/session.sock)')
    .option('--program <command>', 'how sshd should run buildbox in the forced command (default: this node and script)')
    .action(async (user: string, opts: BoxOpts & { registry?: string; socket?: string; program?: string }) => {
      if (!isValidUserName(user)) return; // not a name the registry can hold: no keys
      const c = boxConfig(opts);
      const dir = opts.registry ?? registryDir(c);
      const reg = await loadRegistry(dir).catch((e: Error) => {
        throw new UsageError(`cannot read the registry at ${dir}: ${e.message}`, 1);
      });
      const u = reg.users.get(user);
      if (!u) return;
      const socket = opts.socket ?? join(c.stateDir, SESSION_SOCKET_FILE);
      const command = sessionCommand(opts.program ?? selfProgram(), socket, user);
      let out = '';
      for (const k of [...u.keys, ...u.unusableKeys]) out += `${forcedKeyLine(k, command)}\n`;
      process.stdout.write(out);
    });

  program
    .command('session')
    .description("sshd's forced command: serve SSH_ORIGINAL_COMMAND for USER through the running box")
    .argument('<user>', 'registry user (fixed by authorized-keys)')
    .option('--socket <path>', 'session socket of the box (default: <state-dir>/session.sock)')
    .option('-c, --config <file>', 'the box config (TOML)')
    .option('--state-dir <dir>', 'the box state directory')
    .action(async (user: string, opts: BoxOpts & { socket?: string }) => {
      const socket = opts.socket ?? join(boxConfig(opts).stateDir, SESSION_SOCKET_FILE);
      const command = process.env.SSH_ORIGINAL_COMMAND ?? '';
      const ip = process.env.SSH_CONNECTION?.split(' ')[0];
      const code = await runSessionClient(
        socket,
        user,
        command,
        { stdin: process.stdin, stdout: process.stdout, stderr: process.stderr },
        { keyFingerprint: authFingerprint(), remoteAddress: ip },
      );
      process.stdin.destroy();
      process.exitCode = code;
    });
}
