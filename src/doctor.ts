/**
 * `buildbox doctor`: runs on the client machine and checks, one line each, everything that makes Nix give up with
 * "cannot connect … trying other available machines": the key file, its passphrase, the box's host key (expected
 * fingerprint, root's known_hosts or the machines line's pinned key), authentication, both protocol handshakes,
 * systems and features, and a round trip of a tiny store path. It uses the real `ssh`, as the nix-daemon does, and
 * speaks the Nix protocols itself over that ssh's stdio.
 *
 * Exit status: 0 all checks passed, 1 some check failed, 3 the host key did not match (stopped at once).
 */
import { type ChildProcessWithoutNullStreams, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { accessSync, constants, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { BOX_INFO_COMMAND, type BoxInfo, type MachineEntry, parseBoxInfo, parseMachines } from './client-config.js';
import { sha256 } from './hash.js';
import { fingerprintOfBlob } from './host-key.js';
import { SERVE_MAGIC_1, SERVE_MAGIC_2, SERVE_PROTOCOL_VERSION } from './serve-protocol.js';
import { makeTextPath, renderContentAddress } from './store-path.js';
import { encodeString, WireReader, WireWriter } from './wire.js';
import {
  STDERR_ERROR,
  STDERR_LAST,
  STDERR_NEXT,
  STDERR_RESULT,
  STDERR_START_ACTIVITY,
  STDERR_STOP_ACTIVITY,
  WORKER_MAGIC_1,
  WORKER_MAGIC_2,
  WORKER_PROTOCOL_VERSION,
} from './worker-protocol.js';

export const EXIT_OK = 0;
export const EXIT_FAILED = 1;
export const EXIT_HOST_KEY_MISMATCH = 3;

export type CheckStatus = 'pass' | 'fail' | 'skip';

export interface Check {
  id: string;
  title: string;
  status: CheckStatus;
  /** What was found (versions, paths, fingerprints…). */
  detail: string;
  /** For a failed check: what to do about it. */
  fix?: string;
}

export interface DoctorOptions {
  /** `[ssh://|ssh-ng://]USER@HOST[:PORT]` */
  target: string;
  /** Private key file (default: what ssh's configuration would use). */
  key?: string;
  /** `SHA256:…` the box's host key must have. */
  expectFingerprint?: string;
  /** known_hosts files to check instead of the ones root's ssh uses. */
  knownHosts?: string[];
  /** ssh config file (`ssh -F`), default ssh's own. */
  sshConfig?: string;
  /** Features the builds you send need. */
  requireFeatures?: string[];
  /** A `builders` value (or `@file`) instead of the local Nix configuration's. */
  builders?: string;
  /** Environment for ssh and nix. */
  env?: NodeJS.ProcessEnv;
  /** Per-step timeout. */
  timeoutMs?: number;
}

export interface DoctorTarget {
  protocol: 'ssh' | 'ssh-ng' | null;
  user: string;
  host: string;
  port: number;
  /** Host ssh actually connects to (after ssh's configuration). */
  hostName: string;
  key: string | null;
}

export interface DoctorReport {
  target: DoctorTarget;
  ok: boolean;
  /** The doctor stopped early (host key mismatch). */
  stopped: boolean;
  exitCode: number;
  checks: Check[];
  box?: BoxInfo;
}

export class DoctorUsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DoctorUsageError';
  }
}

export function parseTarget(s: string): {
  protocol: 'ssh' | 'ssh-ng' | null;
  user: string | null;
  host: string;
  port: number | null;
} {
  const m = /^(?:(ssh|ssh-ng):\/\/)?(?:([^@/\s]+)@)?(\[[0-9A-Fa-f:.]+\]|[^:/@\s[\]]+)(?::(\d{1,5}))?\/?$/.exec(s);
  if (!m)
    throw new DoctorUsageError(`cannot read target ${JSON.stringify(s)}: expected [ssh://|ssh-ng://]USER@HOST[:PORT]`);
  const port = m[4] === undefined ? null : Number(m[4]);
  if (port !== null && (port < 1 || port > 65535)) throw new DoctorUsageError(`invalid port in ${JSON.stringify(s)}`);
  const host = m[3]!.startsWith('[') ? m[3]!.slice(1, -1) : m[3]!;
  return { protocol: (m[1] as 'ssh' | 'ssh-ng' | undefined) ?? null, user: m[2] ?? null, host, port };
}

interface RunResult {
  code: number;
  stdout: Buffer;
  stderr: string;
}

function runProcess(
  cmd: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number; input?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve) => {
    let child: ChildProcessWithoutNullStreams;
    try {
      child = spawn(cmd, args, { env: opts.env ?? process.env, stdio: ['pipe', 'pipe', 'pipe'] });
    } catch (e) {
      resolve({ code: 127, stdout: Buffer.alloc(0), stderr: (e as Error).message });
      return;
    }
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 30_000);
    child.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve({ code: e.code === 'ENOENT' ? 127 : 126, stdout: Buffer.alloc(0), stderr: `${cmd}: ${e.message}` });
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({
        code: code ?? (signal === 'SIGKILL' ? 124 : 128),
        stdout: Buffer.concat(out),
        stderr: Buffer.concat(err).toString(),
      });
    });
    child.stdin.on('error', () => {});
    child.stdin.end(opts.input ?? '');
  });
}

function firstLine(s: string): string {
  return (
    s
      .split('\n')
      .map((l) => l.trim())
      .find((l) => l !== '' && !l.startsWith('Warning: Permanently added')) ?? ''
  );
}

function expandHome(p: string): string {
  return p === '~' ? homedir() : p.startsWith('~/') ? join(homedir(), p.slice(2)) : p;
}

/** `ssh -G`: the configuration ssh would use for this destination. */
async function sshEffectiveConfig(
  host: string,
  user: string | null,
  port: number | null,
  opts: DoctorOptions,
): Promise<Map<string, string[]>> {
  const args = ['-G'];
  if (opts.sshConfig) args.push('-F', opts.sshConfig);
  if (port !== null) args.push('-p', String(port));
  if (user !== null) args.push('-l', user);
  args.push(host);
  const r = await runProcess('ssh', args, { env: opts.env, timeoutMs: opts.timeoutMs ?? 10_000 });
  const map = new Map<string, string[]>();
  if (r.code !== 0) return map;
  for (const line of r.stdout.toString().split('\n')) {
    const i = line.indexOf(' ');
    if (i <= 0) continue;
    const k = line.slice(0, i).toLowerCase();
    const v = line.slice(i + 1).trim();
    map.set(k, [...(map.get(k) ?? []), v]);
  }
  return map;
}

export interface ScannedKey {
  type: string;
  publicKey: string;
  fingerprint: string;
}

function keyFromLine(type: string, b64: string): ScannedKey | undefined {
  const blob = Buffer.from(b64, 'base64');
  if (blob.length === 0) return undefined;
  return { type, publicKey: `${type} ${b64}`, fingerprint: fingerprintOfBlob(blob) };
}

/** Is anything listening? A clear reason when not. */
function tcpProbe(host: string, port: number, timeoutMs: number): Promise<string | null> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    const timer = setTimeout(() => {
      s.destroy();
      resolve(`no answer within ${Math.round(timeoutMs / 1000)} s (a firewall, or the wrong host)`);
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      s.destroy();
      resolve(null);
    });
    s.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      resolve(
        e.code === 'ECONNREFUSED'
          ? 'connection refused (nothing listens on that port: is the box running?)'
          : e.code === 'ENOTFOUND' || e.code === 'EAI_AGAIN'
            ? `the host name does not resolve (${e.code})`
            : `${e.code ?? e.message}`,
      );
    });
  });
}

/** Normalise `SHA256:abc`, `abc` or `sha256:abc=` to `SHA256:abc`. */
export function normaliseFingerprint(fp: string): string {
  const body = fp
    .trim()
    .replace(/^sha256:/i, '')
    .replace(/=+$/, '');
  return `SHA256:${body}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Talking to the box through ssh.

interface SshChannel {
  child: ChildProcessWithoutNullStreams;
  r: WireReader;
  w: WireWriter;
  stderr(): string;
  exited: Promise<number>;
  close(): Promise<number>;
}

class SshContext {
  constructor(
    readonly target: DoctorTarget,
    readonly opts: DoctorOptions,
    readonly knownHostsFile: string,
    readonly alias: string,
  ) {}

  args(command: string): string[] {
    const a = [
      '-x',
      '-a',
      '-T',
      '-o',
      'BatchMode=yes',
      '-o',
      'ConnectTimeout=10',
      '-o',
      'ControlMaster=no',
      '-o',
      'ControlPath=none',
      '-o',
      'StrictHostKeyChecking=yes',
      '-o',
      `UserKnownHostsFile=${this.knownHostsFile}`,
      '-o',
      'GlobalKnownHostsFile=/dev/null',
      '-o',
      `HostKeyAlias=${this.alias}`,
      '-o',
      'LogLevel=ERROR',
    ];
    if (this.opts.sshConfig) a.push('-F', this.opts.sshConfig);
    if (this.target.key) a.push('-i', this.target.key, '-o', 'IdentitiesOnly=yes');
    a.push('-p', String(this.target.port), '-l', this.target.user, this.target.host, '--', command);
    return a;
  }

  run(command: string): Promise<RunResult> {
    return runProcess('ssh', this.args(command), { env: this.opts.env, timeoutMs: this.opts.timeoutMs ?? 60_000 });
  }

  open(command: string): SshChannel {
    const child = spawn('ssh', this.args(command), {
      env: this.opts.env ?? process.env,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const err: Buffer[] = [];
    child.stderr.on('data', (d: Buffer) => err.push(d));
    child.stdin.on('error', () => {});
    const exited = new Promise<number>((resolve) => {
      child.on('close', (code) => resolve(code ?? 255));
      child.on('error', () => resolve(255));
    });
    const timer = setTimeout(() => child.kill('SIGKILL'), this.opts.timeoutMs ?? 60_000);
    void exited.then(() => clearTimeout(timer));
    return {
      child,
      r: new WireReader(child.stdout, { maxString: 1 << 20, maxList: 10_000 }),
      w: new WireWriter(child.stdin),
      stderr: () => Buffer.concat(err).toString(),
      exited,
      close: async () => {
        child.stdin.end();
        const t = setTimeout(() => child.kill('SIGKILL'), 5000);
        const code = await exited;
        clearTimeout(t);
        return code;
      },
    };
  }
}

function versionString(v: number): string {
  return `${v >> 8}.${v & 0xff}`;
}

async function serveHandshake(ch: SshChannel): Promise<number> {
  ch.w.u64(SERVE_MAGIC_1).u64(SERVE_PROTOCOL_VERSION);
  await ch.w.flush();
  const magic = await ch.r.readU64('serve magic');
  if (magic !== SERVE_MAGIC_2) {
    throw new Error(`'nix-store --serve' protocol mismatch: got 0x${magic.toString(16)} instead of the server magic`);
  }
  const v = await ch.r.readU64('serve protocol version');
  if ((v & 0xff00) !== 0x200) throw new Error(`unsupported 'nix-store --serve' protocol version ${versionString(v)}`);
  return v;
}

async function readFields(r: WireReader): Promise<void> {
  const n = await r.readCount('fields', 100);
  for (let i = 0; i < n; i++) {
    const kind = await r.readU64('field kind');
    if (kind === 0) await r.readU64('field');
    else if (kind === 1) await r.readString('field');
    else throw new Error(`unknown field kind ${kind} in a log message`);
  }
}

async function readStderrUntilLast(r: WireReader, v: number): Promise<string[]> {
  const notes: string[] = [];
  for (;;) {
    const tag = await r.readU64('stderr message');
    switch (tag) {
      case STDERR_LAST:
        return notes;
      case STDERR_NEXT:
        notes.push((await r.readString('log line')).trim());
        break;
      case STDERR_START_ACTIVITY:
        await r.readU64('activity id');
        await r.readU64('level');
        await r.readU64('type');
        await r.readString('text');
        await readFields(r);
        await r.readU64('parent');
        break;
      case STDERR_STOP_ACTIVITY:
        await r.readU64('activity id');
        break;
      case STDERR_RESULT:
        await r.readU64('activity id');
        await r.readU64('result type');
        await readFields(r);
        break;
      case STDERR_ERROR: {
        let msg: string;
        if ((v & 0xff) >= 26) {
          await r.readString('error type');
          await r.readU64('level');
          await r.readString('error name');
          msg = await r.readString('error message');
          await r.readU64('has position');
          const traces = await r.readCount('traces', 1000);
          for (let i = 0; i < traces; i++) {
            await r.readU64('has position');
            await r.readString('trace');
          }
        } else {
          msg = await r.readString('error message');
          await r.readU64('exit status');
        }
        throw new Error(`the box answered with an error: ${msg.replace(/\x1b\[[0-9;]*m/g, '')}`);
      }
      default:
        throw new Error(`unexpected message 0x${tag.toString(16)} from the box`);
    }
  }
}

interface WorkerHello {
  version: number;
  nixVersion: string | null;
  trusted: number | null;
  features: string[];
}

async function workerHandshake(ch: SshChannel): Promise<WorkerHello> {
  ch.w.u64(WORKER_MAGIC_1);
  await ch.w.flush();
  const magic = await ch.r.readU64('worker magic');
  if (magic !== WORKER_MAGIC_2) {
    throw new Error(`'nix-daemon --stdio' protocol mismatch: got 0x${magic.toString(16)} instead of the server magic`);
  }
  const serverVersion = await ch.r.readU64('worker protocol version');
  if (serverVersion >> 8 !== 1 || (serverVersion & 0xff) < 10) {
    throw new Error(`unsupported 'nix-daemon' protocol version ${versionString(serverVersion)}`);
  }
  ch.w.u64(WORKER_PROTOCOL_VERSION);
  const v = Math.min(serverVersion, WORKER_PROTOCOL_VERSION);
  const minor = v & 0xff;
  let features: string[] = [];
  if (minor >= 38) {
    ch.w.strings([]);
    await ch.w.flush();
    features = await ch.r.readStrings('server features', 1024, 1000);
  }
  if (minor >= 14) ch.w.u64(0);
  if (minor >= 11) ch.w.u64(0);
  await ch.w.flush();
  const nixVersion = minor >= 33 ? await ch.r.readString('Nix version', 1024) : null;
  const trusted = minor >= 35 ? await ch.r.readU64('trusted flag') : null;
  await readStderrUntilLast(ch.r, v);
  return { version: v, nixVersion, trusted, features };
}

/** A NAR holding one regular file. */
export function narOfFile(contents: Buffer): Buffer {
  return Buffer.concat(
    ['nix-archive-1', '(', 'type', 'regular', 'contents']
      .map((s) => encodeString(s))
      .concat([encodeString(contents), encodeString(')')]),
  );
}

async function roundTrip(ctx: SshContext): Promise<string> {
  const ch = ctx.open('nix-store --serve --write');
  try {
    const v = await serveHandshake(ch);
    if ((v & 0xff) < 5)
      throw new Error(`the box's serve protocol ${versionString(v)} cannot receive paths (needs 2.5)`);
    const contents = Buffer.from(
      `buildbox doctor round trip ${new Date().toISOString()} ${randomBytes(8).toString('hex')}\n`,
    );
    const contentHash = sha256(contents);
    const path = makeTextPath('buildbox-doctor-round-trip', contentHash);
    const nar = narOfFile(contents);
    const started = Date.now();
    ch.w
      .u64(9) // AddToStoreNar
      .string(path)
      .string('')
      .string(sha256(nar).toBase16())
      .strings([])
      .u64(Math.floor(Date.now() / 1000))
      .u64(nar.length)
      .u64(0)
      .strings([])
      .string(renderContentAddress({ method: 'text', hash: contentHash }))
      .raw(nar);
    await ch.w.flush();
    const ok = await ch.r.readU64('AddToStoreNar reply');
    if (ok !== 1) throw new Error(`the box answered ${ok} to AddToStoreNar`);
    ch.w.u64(1).u64(0).u64(0).strings([path]); // QueryValidPaths
    await ch.w.flush();
    const valid = await ch.r.readStrings('valid paths', 4096, 10);
    if (!valid.includes(path)) throw new Error(`the box accepted ${path} but does not report it as valid`);
    ch.w.u64(3).string(path); // DumpStorePath
    await ch.w.flush();
    const back = await ch.r.readExact(nar.length, 'NAR of the round-trip path');
    if (!back.equals(nar)) throw new Error(`the NAR read back for ${path} differs from the one sent`);
    const ms = Date.now() - started;
    return `${path} uploaded, found valid and read back identical (${nar.length}-byte NAR, ${ms} ms)`;
  } catch (e) {
    const extra = firstLine(ch.stderr());
    throw new Error(`${(e as Error).message}${extra ? ` — box says: ${extra}` : ''}`);
  } finally {
    await ch.close();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The local Nix side.

export interface LocalNix {
  system: string;
  extraPlatforms: string[];
  /** Entries of the local `builders` setting (and the machines file it names). */
  machines: MachineEntry[];
  source: string;
}

function defaultSystem(): string {
  const arch = process.arch === 'x64' ? 'x86_64' : process.arch === 'arm64' ? 'aarch64' : process.arch;
  return `${arch}-linux`;
}

function machinesFromSpec(spec: string): MachineEntry[] {
  const out: MachineEntry[] = [];
  for (const part of spec.split(/[;\n]/)) {
    const p = part.trim();
    if (p === '') continue;
    if (p.startsWith('@')) {
      try {
        out.push(...parseMachines(readFileSync(p.slice(1), 'utf8')));
      } catch {
        // unreadable machines file: nothing claimed from it
      }
    } else out.push(...parseMachines(p));
  }
  return out;
}

export async function localNix(opts: DoctorOptions): Promise<LocalNix> {
  const r = await runProcess('nix', ['--extra-experimental-features', 'nix-command', 'show-config'], {
    env: opts.env,
    timeoutMs: 20_000,
  });
  const settings = new Map<string, string>();
  if (r.code === 0) {
    for (const line of r.stdout.toString().split('\n')) {
      const m = /^([A-Za-z0-9-]+) = (.*)$/.exec(line);
      if (m) settings.set(m[1]!, m[2]!);
    }
  }
  const builders = opts.builders ?? settings.get('builders') ?? '';
  return {
    system: settings.get('system') ?? defaultSystem(),
    extraPlatforms: (settings.get('extra-platforms') ?? '').split(/\s+/).filter((x) => x !== ''),
    machines: machinesFromSpec(builders),
    source: r.code === 0 ? '`nix show-config`' : 'defaults (`nix show-config` did not run)',
  };
}

// ---------------------------------------------------------------------------------------------------------------

export async function runDoctor(opts: DoctorOptions): Promise<DoctorReport> {
  const parsed = parseTarget(opts.target);
  const cfg = await sshEffectiveConfig(parsed.host, parsed.user, parsed.port, opts);
  const user = parsed.user ?? cfg.get('user')?.[0] ?? process.env.USER ?? 'root';
  const port = parsed.port ?? Number(cfg.get('port')?.[0] ?? 22);
  const hostName = cfg.get('hostname')?.[0] ?? parsed.host;
  const hostKeyAlias = cfg.get('hostkeyalias')?.[0];
  let key = opts.key ?? null;
  if (key === null) {
    key = (cfg.get('identityfile') ?? []).map(expandHome).find((f) => existsSync(f)) ?? null;
  }
  const target: DoctorTarget = { protocol: parsed.protocol, user, host: parsed.host, port, hostName, key };
  const checks: Check[] = [];
  const report: DoctorReport = { target, ok: false, stopped: false, exitCode: EXIT_FAILED, checks };
  const add = (c: Check) => checks.push(c);
  const pass = (id: string, title: string, detail: string) => add({ id, title, status: 'pass', detail });
  const fail = (id: string, title: string, detail: string, fix: string) =>
    add({ id, title, status: 'fail', detail, fix });
  const skip = (id: string, title: string, why: string) => add({ id, title, status: 'skip', detail: why });
  const finish = (exitCode?: number): DoctorReport => {
    report.ok = checks.every((c) => c.status === 'pass');
    report.exitCode = exitCode ?? (report.ok ? EXIT_OK : EXIT_FAILED);
    return report;
  };
  const isRoot = process.getuid?.() === 0;
  const timeoutMs = opts.timeoutMs ?? 30_000;

  // 1. The key file.
  const newKey = `ssh-keygen -t ed25519 -N '' -C ${user}@buildbox -f /root/.ssh/id_buildbox`;
  if (key === null) {
    fail(
      'key-file',
      'key file',
      "no key given and none of ssh's default identities exists",
      `pass --key FILE (the private key whose .pub is in the box's registry as keys/${user}); to make one: ${newKey}`,
    );
  } else if (!existsSync(key)) {
    fail(
      'key-file',
      'key file',
      `${key} does not exist`,
      `make it with ${newKey.replace('/root/.ssh/id_buildbox', key)} and send ${key}.pub to the box's admin for keys/${user}`,
    );
    key = null;
  } else {
    const st = statSync(key);
    let readable = true;
    try {
      accessSync(key, constants.R_OK);
    } catch {
      readable = false;
    }
    if (!st.isFile()) {
      fail('key-file', 'key file', `${key} is not a regular file`, 'pass the private key file itself');
      key = null;
    } else if (isRoot && !readable) {
      fail(
        'key-file',
        'key file',
        `${key} is not readable by root (a network file system, or a home directory root cannot enter?)`,
        `put the key somewhere local that root can read, e.g. /root/.ssh/id_buildbox (mode 600)`,
      );
      key = null;
    } else if ((st.mode & 0o077) !== 0) {
      fail(
        'key-file',
        'key file',
        `${key} is readable by others (mode ${(st.mode & 0o777).toString(8)}); ssh ignores such keys`,
        `chmod 600 ${key}`,
      );
    } else {
      pass(
        'key-file',
        'key file',
        `${key} exists${isRoot ? ' and is readable by root' : ` (mode ${(st.mode & 0o777).toString(8)}; run the doctor with sudo to check as root, like the nix-daemon)`}`,
      );
    }
  }

  // 2. No passphrase.
  if (key === null) skip('passphrase', 'key without passphrase', 'no usable key file');
  else {
    const r = await runProcess('ssh-keygen', ['-y', '-P', '', '-f', key], { env: opts.env, timeoutMs });
    if (r.code === 0) {
      const pub = r.stdout.toString().trim().split(/\s+/);
      const fp = pub[1] ? fingerprintOfBlob(Buffer.from(pub[1], 'base64')) : '';
      pass('passphrase', 'key without passphrase', `${key} opens without a passphrase (public key ${pub[0]} ${fp})`);
    } else if (/passphrase/i.test(r.stderr)) {
      fail(
        'passphrase',
        'key without passphrase',
        `${key} is protected by a passphrase; the nix-daemon cannot type it`,
        `use a key without passphrase for the box: ${newKey}, and register its .pub (or remove the passphrase: ssh-keygen -p -N '' -f ${key})`,
      );
    } else {
      fail(
        'passphrase',
        'key without passphrase',
        `ssh-keygen cannot read ${key}: ${firstLine(r.stderr)}`,
        'pass the private key file (not the .pub)',
      );
    }
  }

  // 3. The box answers, and with which host keys.
  const unreachable = await tcpProbe(hostName, port, Math.min(timeoutMs, 10_000));
  if (unreachable !== null) {
    fail(
      'reach',
      'box reachable',
      `${hostName}:${port}: ${unreachable}`,
      'check the host name and port (buildbox client-config prints them); ask the admin whether the box is up',
    );
    skip('known-hosts', 'host key known', 'the box is not reachable');
    for (const [id, title] of REMOTE_CHECKS) skip(id, title, 'the box is not reachable');
    return finish();
  }
  const scan = await runProcess('ssh-keyscan', ['-T', '10', '-p', String(port), hostName], {
    env: opts.env,
    timeoutMs,
  });
  const scanned: ScannedKey[] = [];
  for (const line of scan.stdout.toString().split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f.length < 3 || line.startsWith('#')) continue;
    const k = keyFromLine(f[1]!, f[2]!);
    if (k) scanned.push(k);
  }
  if (scanned.length === 0) {
    fail(
      'reach',
      'box reachable',
      `${hostName}:${port} accepts connections but presented no SSH host key (${firstLine(scan.stderr) || 'ssh-keyscan found none'})`,
      'is that port really the build box? (an HTTP or other service answers there)',
    );
    skip('known-hosts', 'host key known', 'no SSH server found');
    for (const [id, title] of REMOTE_CHECKS) skip(id, title, 'no SSH server found');
    return finish();
  }
  pass(
    'reach',
    'box reachable',
    `${hostName}:${port} answers with host key ${scanned.map((k) => `${k.type} ${k.fingerprint}`).join(', ')}`,
  );

  // 4. The expected fingerprint.
  let trusted = scanned;
  if (opts.expectFingerprint) {
    const want = normaliseFingerprint(opts.expectFingerprint);
    const match = scanned.filter((k) => k.fingerprint === want);
    if (match.length === 0) {
      fail(
        'fingerprint',
        'host key fingerprint',
        `HOST KEY MISMATCH: ${hostName}:${port} presents ${scanned.map((k) => k.fingerprint).join(', ')} but you expected ${want}`,
        'STOP: do not connect and do not add this key anywhere. Someone may be intercepting the connection, or the ' +
          'box got a new key or a new address. Ask the box admin for the current fingerprint (buildbox fingerprint) ' +
          'over a channel you trust.',
      );
      report.stopped = true;
      return finish(EXIT_HOST_KEY_MISMATCH);
    }
    trusted = match;
    pass('fingerprint', 'host key fingerprint', `the box presents the expected ${want}`);
  }

  // 5. Host key known to root's ssh (or pinned by the machines line).
  const lookup = hostKeyAlias ?? (port === 22 ? hostName : `[${hostName}]:${port}`);
  const local = await localNix(opts);
  const entries = local.machines.filter(
    (m) => (m.host === parsed.host || m.host === hostName) && (m.user === null || m.user === user),
  );
  const pinned = entries.map((e) => e.publicHostKey).filter((k): k is string => k !== null);
  const sameKey = (a: string, b: string) =>
    a.trim().split(/\s+/).slice(0, 2).join(' ') === b.trim().split(/\s+/).slice(0, 2).join(' ');
  const knownLine = `${lookup} ${(trusted.find((k) => k.type === 'ssh-ed25519') ?? trusted[0]!).publicKey}`;
  if (pinned.length > 0) {
    const bad = pinned.find((p) => !trusted.some((k) => sameKey(k.publicKey, p)));
    if (bad) {
      fail(
        'known-hosts',
        'host key pinned',
        `HOST KEY MISMATCH: your machines line pins ${bad.split(/\s+/)[0]} ${fingerprintOf(bad)} for ${parsed.host}, but the box presents ${trusted.map((k) => k.fingerprint).join(', ')}`,
        'STOP: if the box really changed its key, ask the admin for the new fingerprint and regenerate the line with buildbox client-config; otherwise someone may be intercepting the connection',
      );
      report.stopped = true;
      return finish(EXIT_HOST_KEY_MISMATCH);
    }
    pass('known-hosts', 'host key pinned', `your machines line for ${parsed.host} pins the key the box presents`);
  } else {
    const files =
      opts.knownHosts ??
      [
        ...(cfg.get('userknownhostsfile')?.flatMap((v) => v.split(/\s+/)) ?? ['~/.ssh/known_hosts']),
        ...(cfg.get('globalknownhostsfile')?.flatMap((v) => v.split(/\s+/)) ?? ['/etc/ssh/ssh_known_hosts']),
      ].map(expandHome);
    const found: Array<{ file: string; key: string }> = [];
    for (const f of [...new Set(files)]) {
      if (!existsSync(f)) continue;
      const r = await runProcess('ssh-keygen', ['-F', lookup, '-f', f], { env: opts.env, timeoutMs });
      for (const line of r.stdout.toString().split('\n')) {
        if (line.startsWith('#') || line.trim() === '') continue;
        const fields = line.trim().split(/\s+/);
        const at = fields[0]!.startsWith('@') ? 1 : 0;
        if (fields[0] === '@revoked' || fields[0] === '@cert-authority') continue;
        if (fields.length >= at + 3) found.push({ file: f, key: `${fields[at + 1]} ${fields[at + 2]}` });
      }
    }
    const good = found.find((e) => trusted.some((k) => sameKey(k.publicKey, e.key)));
    if (good) {
      pass('known-hosts', 'host key in known_hosts', `${lookup} is in ${good.file} with the key the box presents`);
    } else if (found.length > 0) {
      fail(
        'known-hosts',
        'host key in known_hosts',
        `HOST KEY MISMATCH: ${found[0]!.file} has ${fingerprintOf(found[0]!.key)} for ${lookup}, but the box presents ${trusted.map((k) => k.fingerprint).join(', ')}`,
        'STOP: ssh (and Nix) will refuse to connect, rightly, until you find out why the key changed. Ask the box ' +
          `admin; if the change is genuine, replace the entry: ssh-keygen -R '${lookup}' -f ${found[0]!.file}`,
      );
      report.stopped = true;
      return finish(EXIT_HOST_KEY_MISMATCH);
    } else {
      fail(
        'known-hosts',
        'host key in known_hosts',
        `${lookup} is in none of ${[...new Set(files)].join(', ')}${isRoot ? '' : " (run with sudo to read root's files)"}`,
        `${opts.expectFingerprint ? '' : 'after checking the fingerprint with the admin, '}add it for root: echo '${knownLine}' | sudo tee -a /root/.ssh/known_hosts ` +
          "(NixOS: programs.ssh.knownHosts, see buildbox client-config) — or pin it in the machines line's last field",
      );
    }
  }

  // From here on ssh checks the box's key against a temporary known_hosts holding the key found above.
  const tmp = mkdtempSync(join(tmpdir(), 'buildbox-doctor-'));
  try {
    const alias = 'buildbox-doctor-target';
    const kh = join(tmp, 'known_hosts');
    writeFileSync(kh, trusted.map((k) => `${alias} ${k.publicKey}\n`).join(''));
    const ctx = new SshContext(target, opts, kh, alias);

    // 6. Authentication (and what the box says about itself).
    const auth = await ctx.run(BOX_INFO_COMMAND);
    if (auth.code === 255) {
      const why = firstLine(auth.stderr);
      if (/permission denied/i.test(auth.stderr)) {
        fail(
          'auth',
          'authentication',
          `the box refused ${key ?? 'your keys'} for user ${user} (${why})`,
          checks.some((c) => c.id === 'passphrase' && c.status === 'fail')
            ? 'the key has a passphrase (see above), which ssh cannot use unattended: fix that first'
            : `check that ${user} is your name in the box's registry and that ${key ? `${key}.pub` : 'your public key'} ` +
                `is in its keys/${user} (the admin adds it; the box reloads its registry by itself)`,
        );
      } else {
        fail(
          'auth',
          'authentication',
          `ssh failed: ${why || `exit ${auth.code}`}`,
          'run the same with ssh -v to see where it stops',
        );
      }
      for (const [id, title] of REMOTE_CHECKS.slice(1)) skip(id, title, 'not authenticated');
      return finish();
    }
    pass('auth', 'authentication', `logged in as ${user}${key ? ` with ${key}` : ''}`);
    let info: BoxInfo | undefined;
    let infoError = '';
    if (auth.code === 0) {
      try {
        info = parseBoxInfo(auth.stdout.toString());
        report.box = info;
      } catch (e) {
        infoError = (e as Error).message;
      }
    } else infoError = firstLine(auth.stderr) || `exit ${auth.code}`;

    // 7. nix-store --serve.
    {
      const ch = ctx.open('nix-store --serve --write');
      try {
        const v = await serveHandshake(ch);
        pass('serve', 'nix-store --serve handshake (ssh://)', `protocol ${versionString(v)}`);
      } catch (e) {
        fail(
          'serve',
          'nix-store --serve handshake (ssh://)',
          `${(e as Error).message}${stderrNote(ch.stderr())}`,
          SERVE_FIX,
        );
      } finally {
        await ch.close();
      }
    }

    // 8. nix-daemon --stdio.
    {
      const ch = ctx.open('nix-daemon --stdio');
      try {
        const h = await workerHandshake(ch);
        const trust = h.trusted === null ? 'not said' : h.trusted === 1 ? 'yes' : h.trusted === 2 ? 'no' : 'unknown';
        pass(
          'worker',
          'nix-daemon --stdio handshake (ssh-ng://)',
          `protocol ${versionString(h.version)}${h.nixVersion ? `, box says Nix ${h.nixVersion}` : ''}, trusted: ${trust}`,
        );
      } catch (e) {
        fail(
          'worker',
          'nix-daemon --stdio handshake (ssh-ng://)',
          `${(e as Error).message}${stderrNote(ch.stderr())}`,
          SERVE_FIX,
        );
      } finally {
        await ch.close();
      }
    }

    // 9. Systems and 10. features.
    if (!info) {
      fail(
        'systems',
        'systems',
        `the box did not answer ${BOX_INFO_COMMAND}: ${infoError}`,
        'the box is not a buildbox, or an old one: compare its systems with the admin by hand',
      );
      skip('features', 'features', `no answer to ${BOX_INFO_COMMAND}`);
    } else {
      const wanted = [local.system, ...local.extraPlatforms];
      const claimed = [...new Set(entries.flatMap((e) => e.systems))];
      const offered = new Set(info.systems);
      const claimedMissing = claimed.filter((s) => !offered.has(s));
      if (claimedMissing.length > 0) {
        fail(
          'systems',
          'systems',
          `your builders line claims ${claimedMissing.join(', ')} for this box, which builds only ${info.systems.join(', ')}`,
          'fix the systems field of the box in your machines line / nix.buildMachines (buildbox client-config prints it)',
        );
      } else if (!wanted.some((s) => offered.has(s)) && claimed.length === 0) {
        fail(
          'systems',
          'systems',
          `the box builds ${info.systems.join(', ')}; your Nix (${local.source}) wants ${wanted.join(', ')}`,
          'this box cannot build for your system; builds for its systems can still be sent (e.g. nix build --system …)',
        );
      } else {
        pass(
          'systems',
          'systems',
          `the box builds ${info.systems.join(', ')}; your Nix: system ${local.system}${local.extraPlatforms.length ? `, extra-platforms ${local.extraPlatforms.join(' ')}` : ''}`,
        );
      }
      const offeredFeatures = new Set([...info.supportedFeatures, ...info.mandatoryFeatures]);
      const required = [
        ...new Set([
          ...(opts.requireFeatures ?? []),
          ...entries.flatMap((e) => [...e.supportedFeatures, ...e.mandatoryFeatures]),
        ]),
      ];
      const missing = required.filter((f) => !offeredFeatures.has(f));
      const mandatory = info.mandatoryFeatures.length ? `; mandatory: ${info.mandatoryFeatures.join(', ')}` : '';
      if (missing.length > 0) {
        fail(
          'features',
          'features',
          `the box lacks ${missing.join(', ')} (it offers ${[...offeredFeatures].join(', ') || 'none'}${mandatory})`,
          'builds that need it will fail or never be sent there: remove it from the supportedFeatures of this box in your ' +
            'config (buildbox client-config prints what the box has) or ask the admin',
        );
      } else {
        pass(
          'features',
          'features',
          `the box offers ${[...info.supportedFeatures].join(', ') || 'no features'}${mandatory}${required.length ? `; needed: ${required.join(', ')}` : ''}`,
        );
      }
    }

    // 11. A round trip of a tiny path.
    try {
      pass('round-trip', 'round trip of a store path', await roundTrip(ctx));
    } catch (e) {
      fail(
        'round-trip',
        'round trip of a store path',
        (e as Error).message,
        'the box stores nothing for you: ask its admin (disk full? store broken?)',
      );
    }
    return finish();
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

export class RemoteInfoError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RemoteInfoError';
  }
}

/**
 * What a remote box says about itself (`buildbox-info` over SSH), with the host key as ssh-keyscan sees it — for a
 * box behind OpenSSH that is sshd's key, the one clients must pin.
 */
export async function fetchRemoteBoxInfo(o: {
  host: string;
  port: number;
  user: string;
  key?: string;
  expectFingerprint?: string;
  sshConfig?: string;
  env?: NodeJS.ProcessEnv;
}): Promise<{ info: BoxInfo; hostKey: ScannedKey }> {
  const unreachable = await tcpProbe(o.host, o.port, 10_000);
  if (unreachable !== null) throw new RemoteInfoError(`cannot reach ${o.host}:${o.port}: ${unreachable}`);
  const scan = await runProcess('ssh-keyscan', ['-T', '10', '-p', String(o.port), o.host], { env: o.env });
  const keys: ScannedKey[] = [];
  for (const line of scan.stdout.toString().split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f.length < 3 || line.startsWith('#')) continue;
    const k = keyFromLine(f[1]!, f[2]!);
    if (k) keys.push(k);
  }
  if (keys.length === 0) throw new RemoteInfoError(`${o.host}:${o.port} presented no SSH host key`);
  let chosen = keys.find((k) => k.type === 'ssh-ed25519') ?? keys[0]!;
  if (o.expectFingerprint) {
    const want = normaliseFingerprint(o.expectFingerprint);
    const m = keys.find((k) => k.fingerprint === want);
    if (!m) {
      throw new RemoteInfoError(
        `HOST KEY MISMATCH: ${o.host}:${o.port} presents ${keys.map((k) => k.fingerprint).join(', ')}, not ${want}; ` +
          'do not use it until the admin confirms why',
      );
    }
    chosen = m;
  }
  const tmp = mkdtempSync(join(tmpdir(), 'buildbox-info-'));
  try {
    const alias = 'buildbox-info-target';
    const kh = join(tmp, 'known_hosts');
    writeFileSync(kh, `${alias} ${chosen.publicKey}\n`);
    const target: DoctorTarget = {
      protocol: null,
      user: o.user,
      host: o.host,
      port: o.port,
      hostName: o.host,
      key: o.key ?? null,
    };
    const ctx = new SshContext(target, { target: '', sshConfig: o.sshConfig, env: o.env }, kh, alias);
    const r = await ctx.run(BOX_INFO_COMMAND);
    if (r.code !== 0) {
      const why = firstLine(r.stderr) || `exit ${r.code}`;
      throw new RemoteInfoError(
        r.code === 255
          ? `cannot log in to ${o.host}:${o.port} as ${o.user}: ${why} (pass --key with your registered key)`
          : `${o.host}:${o.port} did not answer ${BOX_INFO_COMMAND} (not a buildbox, or an old one): ${why}`,
      );
    }
    const info = parseBoxInfo(r.stdout.toString());
    info.hostKey = chosen.publicKey;
    info.fingerprint = chosen.fingerprint;
    return { info, hostKey: chosen };
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

const SERVE_FIX =
  'the box answered but not with the Nix protocol: something prints on stdout at login (a shell rc file), or the ' +
  'forced command is missing; on an OpenSSH box check its AuthorizedKeysCommand (docs/joining.md)';

const REMOTE_CHECKS: Array<[string, string]> = [
  ['auth', 'authentication'],
  ['serve', 'nix-store --serve handshake (ssh://)'],
  ['worker', 'nix-daemon --stdio handshake (ssh-ng://)'],
  ['systems', 'systems'],
  ['features', 'features'],
  ['round-trip', 'round trip of a store path'],
];

function stderrNote(s: string): string {
  const l = firstLine(s);
  return l ? ` — box says: ${l}` : '';
}

function fingerprintOf(keyLine: string): string {
  const b64 = keyLine.trim().split(/\s+/)[1];
  return b64 ? fingerprintOfBlob(Buffer.from(b64, 'base64')) : '(unreadable key)';
}

export function formatReport(r: DoctorReport): string {
  const lines: string[] = [];
  const t = r.target;
  lines.push(
    `buildbox doctor: ${t.protocol ? `${t.protocol}://` : ''}${t.user}@${t.host}${t.port === 22 ? '' : `:${t.port}`}`,
  );
  for (const c of r.checks) {
    const mark = c.status === 'pass' ? '✓' : c.status === 'fail' ? '✗' : '-';
    lines.push(`${mark} ${c.title}: ${c.detail}`);
    if (c.status === 'fail' && c.fix) lines.push(`    fix: ${c.fix}`);
  }
  if (r.stopped) {
    lines.push('');
    lines.push('!!! STOPPED: the host key is not the one expected. Do not use this box until you know why. !!!');
  } else {
    const failed = r.checks.filter((c) => c.status === 'fail').length;
    lines.push(r.ok ? 'all checks passed' : `${failed} check${failed === 1 ? '' : 's'} failed`);
  }
  return `${lines.join('\n')}\n`;
}
