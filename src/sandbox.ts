/**
 * The bubblewrap sandbox of one build (spec §6.6), run as the build slot's own unprivileged uid.
 *
 * Layout inside (host → sandbox):
 * - `/` a fresh tmpfs, remounted read-only once everything is in place;
 * - `/nix/store` ← `<top>/store`, a fresh, otherwise empty host directory owned by the slot uid: the builder creates
 *   its outputs there exactly as under Nix (as a directory, a file or a symlink), and every object of the input closure
 *   is bind-mounted read-only on top of it at `/nix/store/<base>` (symlink objects are recreated as symlinks). Nothing
 *   else of the store is visible.
 * - `/build` ← `<top>/build` (0700, slot uid), `NIX_BUILD_TOP`;
 * - `/` 0750 and `/nix/store` 1775 as under Nix (observed with Nix 2.8; owned by the build user here);
 * - `/etc` (0755) with `passwd`, `group` and `hosts` exactly as Nix writes them; fixed-output builds instead get the
 *   host's `resolv.conf`, `services` and `hosts` and Nix's `nsswitch.conf`;
 * - private `/tmp` (1777 tmpfs), minimal `/dev` (bwrap's: null zero full random urandom tty, pts, ptmx, fd links) with a
 *   fresh `/dev/shm`, fresh `/proc`;
 * - new user (uid 1000, gid 100 inside), pid, ipc, uts (hostname `localhost`) and — except for fixed-output builds —
 *   network namespaces.
 *
 * Arguments and environment reach bwrap through `--args <fd>` as NUL-separated raw bytes, so latin1 derivation strings
 * arrive byte-exact (process argv/env from Node would be UTF-8 encoded).
 *
 * Killing: the builder runs as PID 1 of its PID namespace (`--as-pid-1`, as under Nix); when it exits or is killed the
 * kernel kills everything left in the namespace. `--die-with-parent` ties it to bwrap, bwrap runs in its own process
 * group which `kill()` signals, and after bwrap the wrapper (as the slot uid) sends SIGKILL to every process of that
 * uid with one `kill(-1)`, as Nix does for its build users. Only when the wrapper itself was killed does
 * `killUidProcesses(uid)` sweep `/proc` for what still runs as the slot uid.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import {
  chmodSync,
  closeSync,
  lstatSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  type Stats,
  writeFileSync,
} from 'node:fs';
import { chmod, chown, mkdir, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { Readable, Writable } from 'node:stream';

export const BWRAP = '/usr/bin/bwrap';
export const SANDBOX_BUILD_DIR = '/build';
export const SANDBOX_UID = 1000;
export const SANDBOX_GID = 100;

/** Nix's /etc/passwd, /etc/group and /etc/hosts inside the sandbox (local-derivation-goal.cc). */
export function etcPasswd(buildDir = SANDBOX_BUILD_DIR): string {
  return (
    `root:x:0:0:Nix build user:${buildDir}:/noshell\n` +
    `nixbld:x:${SANDBOX_UID}:${SANDBOX_GID}:Nix build user:${buildDir}:/noshell\n` +
    'nobody:x:65534:65534:Nobody:/:/noshell\n'
  );
}
export const ETC_GROUP = `root:x:0:\nnixbld:!:${SANDBOX_GID}:\nnogroup:x:65534:\n`;
export const ETC_HOSTS = '127.0.0.1 localhost\n::1 localhost\n';
export const ETC_NSSWITCH = 'hosts: files dns\nservices: files\n';
/** Host files a fixed-output build sees (when they exist), as Nix binds them. */
export const FIXED_OUTPUT_HOST_ETC = ['/etc/resolv.conf', '/etc/services', '/etc/hosts'];

export class SandboxError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SandboxError';
  }
}

/** The host directories of one build's sandbox. */
export interface SandboxDirs {
  /** Private top directory (root-owned, 0711). */
  top: string;
  /** Host side of `/build`. */
  buildDir: string;
  /** Host side of `/nix/store`: outputs appear here as `<storeHostDir>/<base name>`. */
  storeHostDir: string;
  /** Host directory holding the generated /etc files. */
  etcDir: string;
}

/**
 * Create the host directories of a sandbox under `top` (which must not exist; its parent must be traversable by the
 * slot uid): `build` (0700) and `store` (1775) owned by uid/gid, `etc` with the files Nix writes.
 */
export async function prepareSandboxDirs(
  top: string,
  uid: number,
  gid: number,
  opts: { fixedOutput: boolean },
): Promise<SandboxDirs> {
  // Through the thread pool: on a file system slow to create inodes this must not hold up the event loop.
  await mkdir(top, { mode: 0o711 });
  const buildDir = join(top, 'build');
  const storeHostDir = join(top, 'store');
  const etcDir = join(top, 'etc');
  const owned = async (dir: string, mode: number): Promise<void> => {
    await mkdir(dir, { mode });
    await chown(dir, uid, gid);
    await chmod(dir, mode);
  };
  try {
    await chmod(top, 0o711);
    await Promise.all([owned(buildDir, 0o700), owned(storeHostDir, 0o1775), mkdir(etcDir, { mode: 0o755 })]);
    await Promise.all([
      writeFile(join(etcDir, 'passwd'), etcPasswd(), { mode: 0o644 }),
      writeFile(join(etcDir, 'group'), ETC_GROUP, { mode: 0o644 }),
      opts.fixedOutput
        ? writeFile(join(etcDir, 'nsswitch.conf'), ETC_NSSWITCH, { mode: 0o644 })
        : writeFile(join(etcDir, 'hosts'), ETC_HOSTS, { mode: 0o644 }),
    ]);
  } catch (e) {
    await rm(top, { recursive: true, force: true }).catch(() => {}); // nothing half-made stays behind
    throw e;
  }
  return { top, buildDir, storeHostDir, etcDir };
}

export interface SandboxInput {
  /** Store path, e.g. `/nix/store/<hash>-busybox`. */
  path: string;
  /** Where the object lives on the host (`store.realPath`). */
  hostPath: string;
}

export interface SandboxSpec {
  dirs: SandboxDirs;
  /** Store directory as the builder sees it. Default `/nix/store`. */
  storeDir?: string;
  /** The input closure. */
  inputs: SandboxInput[];
  /** Fixed-output builds keep the host network and get the host's resolver files. */
  fixedOutput: boolean;
  /**
   * Builder path and arguments (latin1 strings). With an exec helper (see `writeExecHelper`) the builder gets
   * argv[0] = basename(builder) as under Nix; without one (bwrap 0.8 has no --argv0) argv[0] is the builder path.
   */
  builder: string;
  args: string[];
  /** The builder's complete environment (latin1 strings). */
  env: Map<string, string> | Record<string, string>;
  /** Host path of the exec helper (`writeExecHelper`); absent: argv[0] is the builder path. */
  execHelper?: string;
  /** Forbid creating user namespaces inside the sandbox. Default true. */
  disableUserns?: boolean;
  /** Host path of an extra read-only bind for tests/diagnostics: none by default. */
  extraRoBinds?: Array<{ hostPath: string; path: string }>;
}

function parentsOf(path: string): string[] {
  const out: string[] = [];
  for (let p = dirname(path); p !== '/' && p !== '.'; p = dirname(p)) out.unshift(p);
  return out;
}

/** The bubblewrap argument vector (latin1 strings): options, `--`, builder, arguments. */
export function bwrapArgs(spec: SandboxSpec): string[] {
  const { options, command } = bwrapParts(spec);
  return [...options, '--', ...command];
}

function bwrapParts(spec: SandboxSpec): { options: string[]; command: string[] } {
  const storeDir = spec.storeDir ?? '/nix/store';
  const { dirs } = spec;
  const a: string[] = [
    '--unshare-user',
    '--unshare-pid',
    '--unshare-ipc',
    '--unshare-uts',
    ...(spec.fixedOutput ? [] : ['--unshare-net']),
    ...(spec.disableUserns === false ? [] : ['--disable-userns']),
    '--uid',
    String(SANDBOX_UID),
    '--gid',
    String(SANDBOX_GID),
    '--hostname',
    'localhost',
    '--die-with-parent',
    '--new-session',
    '--as-pid-1',
    '--proc',
    '/proc',
    '--dev',
    '/dev',
    '--perms',
    '1777',
    '--tmpfs',
    '/dev/shm',
    '--remount-ro',
    '/dev',
    '--perms',
    '1777',
    '--tmpfs',
    '/tmp',
    '--bind',
    dirs.buildDir,
    SANDBOX_BUILD_DIR,
    '--perms',
    '0755',
    '--dir',
    '/etc',
    '--ro-bind',
    join(dirs.etcDir, 'passwd'),
    '/etc/passwd',
    '--ro-bind',
    join(dirs.etcDir, 'group'),
    '/etc/group',
  ];
  if (spec.fixedOutput) {
    a.push('--ro-bind', join(dirs.etcDir, 'nsswitch.conf'), '/etc/nsswitch.conf');
    for (const f of FIXED_OUTPUT_HOST_ETC) a.push('--ro-bind-try', f, f);
  } else {
    a.push('--ro-bind', join(dirs.etcDir, 'hosts'), '/etc/hosts');
  }
  for (const p of parentsOf(storeDir)) a.push('--perms', '0755', '--dir', p);
  a.push('--bind', dirs.storeHostDir, storeDir);
  const seen = new Set<string>();
  for (const input of spec.inputs) {
    const base = input.path.slice(input.path.lastIndexOf('/') + 1);
    if (input.path !== `${storeDir}/${base}` || base === '' || base === '.' || base === '..') {
      throw new SandboxError(`input '${input.path}' is not a path in ${storeDir}`);
    }
    if (seen.has(base)) continue;
    seen.add(base);
    let st: Stats;
    try {
      st = lstatSync(input.hostPath);
    } catch (e) {
      throw new SandboxError(
        `store object '${input.path}' is missing on disk at '${input.hostPath}' (${(e as NodeJS.ErrnoException).code})`,
      );
    }
    if (st.isSymbolicLink()) a.push('--symlink', readlinkSync(input.hostPath, 'latin1'), input.path);
    else a.push('--ro-bind', input.hostPath, input.path);
  }
  for (const b of spec.extraRoBinds ?? []) a.push('--ro-bind', b.hostPath, b.path);
  a.push('--chmod', '0750', '/', '--remount-ro', '/', '--chdir', SANDBOX_BUILD_DIR, '--clearenv');
  const env = spec.env instanceof Map ? [...spec.env] : Object.entries(spec.env);
  for (const [k, v] of env) {
    if (k === '' || k.includes('=')) throw new SandboxError(`invalid environment variable name '${k}'`);
    a.push('--setenv', k, v);
  }
  const command = spec.execHelper
    ? [
        `/proc/self/fd/${EXEC_HELPER_FD}`,
        spec.builder,
        spec.builder.slice(spec.builder.lastIndexOf('/') + 1),
        ...spec.args,
      ]
    : [spec.builder, ...spec.args];
  for (const s of [...a, ...command]) {
    if (s.includes('\0')) throw new SandboxError('a builder argument or environment value contains a NUL byte');
  }
  return { options: a, command };
}

export interface SandboxRunOptions {
  uid: number;
  gid: number;
  /** Set the i686 personality (32-bit builds on x86_64), as Nix does. */
  personality?: 'i686';
}

export interface SandboxExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  started: boolean;
  swept: boolean;
}

export interface SandboxProcess {
  readonly child: ChildProcess;
  /** The builder's stdout and stderr, merged into one stream. */
  readonly output: Readable;
  /**
   * Resolves when bwrap has exited. `started`: the builder ran and exited by itself, `code` is then its exit status
   * (128 + n if killed by signal n); false: sandbox setup failed (bwrap's message is in `output`) or it was killed.
   * `swept`: the sandbox's wrapper (running as the slot uid) ended by itself after sending SIGKILL to every other
   * process of the uid — nothing of the build can still run; false if it was killed (`killUidProcesses` is due).
   */
  readonly exited: Promise<SandboxExit>;
  /** SIGKILL the whole sandbox. Safe to call repeatedly and after exit. */
  kill(): void;
}

/**
 * Host-side wrapper (bash, empty environment → C locale, so strings are bytes): read the builder's argv
 * NUL-separated from fd 5 (bwrap's `--args` cannot carry the command), close every other inherited fd but stdio and
 * bwrap's fds 3 and 4, no core dumps, umask 022 (as Nix), then exec bwrap with stderr joined to stdout (one stream, one ordering — the
 * builder's fds 1 and 2 are the same pipe, like Nix's).
 */
const WRAPPER = [
  'mapfile -d "" -t cmd <&5 || exit 125',
  'exec 5<&-',
  'ulimit -c 0',
  'umask 022',
  // biome-ignore lint/suspicious/noTemplateCurlyInString: bash code
  'for f in /proc/$$/fd/*; do n=${f##*/}; case $n in 0|1|2|3|4|6) ;; *) eval "exec $n>&-" 2>/dev/null;; esac; done',
  // biome-ignore lint/suspicious/noTemplateCurlyInString: bash code
  '"$@" -- "${cmd[@]}" 2>&1',
  'rc=$?',
  // Every other process of the slot uid, wherever it is, gets SIGKILL in one kill(-1) by that uid (the kernel lets
  // it signal exactly the processes whose real or saved uid it is); none can fork past it. Then the status of bwrap.
  'kill -s KILL -- -1 2>/dev/null',
  'exit $rc',
].join('\n');

const nulJoin = (xs: string[]): Buffer => Buffer.concat(xs.map((s) => Buffer.from(`${s}\0`, 'latin1')));

/**
 * The exec helper: a 228-byte static x86_64 ELF program that bwrap runs as `/proc/self/fd/6` with argv
 * `[helper, builder, argv0, args…]`. It closes fd 6 and does `execve(builder, [argv0, args…], envp)`, so the builder
 * starts exactly as Nix starts it (argv[0] = basename of the builder, no extra fd, nothing extra in the file system);
 * if execve fails it prints "error: cannot execute the builder" and exits 1. Machine code (intel syntax):
 *   mov edi,6; mov eax,3; syscall                         close(6)
 *   mov rdi,[rsp+16]; lea rsi,[rsp+24]                    argv[1], &argv[2]
 *   mov rax,[rsp]; lea rdx,[rsp+rax*8+16]                 envp = &argv[argc + 1]
 *   mov eax,59; syscall                                   execve
 *   mov edi,2; lea rsi,[rip+msg]; mov edx,34; mov eax,1; syscall; mov edi,1; mov eax,60; syscall
 */
const EXEC_HELPER_CODE_X64 =
  'bf06000000b8030000000f05488b7c2410488d742418488b0424488d54c410b83b0000000f05bf02000000488d3518000000ba22000000' +
  'b8010000000f05bf01000000b83c0000000f056572726f723a2063616e6e6f74206578656375746520746865206275696c6465720a';
const EXEC_HELPER_FD = 6;

/** The exec helper as an ELF file for this machine, or undefined if there is none for its architecture. */
export function execHelperElf(): Buffer | undefined {
  if (process.arch !== 'x64') return undefined;
  const code = Buffer.from(EXEC_HELPER_CODE_X64, 'hex');
  const base = 0x400000;
  const hdr = Buffer.alloc(64 + 56);
  Buffer.from([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]).copy(hdr, 0); // ELF, 64-bit, little-endian, version 1, SysV
  hdr.writeUInt16LE(2, 16); // ET_EXEC
  hdr.writeUInt16LE(0x3e, 18); // x86-64
  hdr.writeUInt32LE(1, 20);
  hdr.writeBigUInt64LE(BigInt(base + hdr.length), 24); // entry
  hdr.writeBigUInt64LE(64n, 32); // program headers right after this header
  hdr.writeUInt16LE(64, 52);
  hdr.writeUInt16LE(56, 54);
  hdr.writeUInt16LE(1, 56);
  // One PT_LOAD, R+X, the whole file.
  const size = BigInt(hdr.length + code.length);
  hdr.writeUInt32LE(1, 64);
  hdr.writeUInt32LE(5, 68);
  hdr.writeBigUInt64LE(0n, 72);
  hdr.writeBigUInt64LE(BigInt(base), 80);
  hdr.writeBigUInt64LE(BigInt(base), 88);
  hdr.writeBigUInt64LE(size, 96);
  hdr.writeBigUInt64LE(size, 104);
  hdr.writeBigUInt64LE(0x1000n, 112);
  return Buffer.concat([hdr, code]);
}

/**
 * Write the exec helper to `path` (0555; readable and executable by the build uids; its file system must not be
 * mounted noexec). Returns false, writing nothing, where there is no helper for this architecture.
 */
export function writeExecHelper(path: string): boolean {
  const elf = execHelperElf();
  if (!elf) return false;
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, elf, { mode: 0o555 });
  chmodSync(tmp, 0o555);
  renameSync(tmp, path);
  return true;
}

/** Start the builder in its sandbox as uid/gid. */
export function spawnSandbox(spec: SandboxSpec, opts: SandboxRunOptions): SandboxProcess {
  const { options, command } = bwrapParts(spec);
  const helperFd = spec.execHelper ? openSync(spec.execHelper, 'r') : undefined;
  const argv = [
    ...(opts.personality === 'i686' ? ['/usr/bin/setarch', 'i686', '--'] : []),
    BWRAP,
    '--args',
    '3',
    '--json-status-fd',
    '4',
  ];
  const child = spawn('/bin/bash', ['-c', WRAPPER, 'buildbox-sandbox', ...argv], {
    uid: opts.uid,
    gid: opts.gid,
    env: {},
    cwd: '/',
    detached: true,
    stdio: ['ignore', 'pipe', 'ignore', 'pipe', 'pipe', 'pipe', helperFd ?? 'ignore'],
  });
  if (helperFd !== undefined) closeSync(helperFd);
  const argsPipe = child.stdio[3] as Writable;
  const statusPipe = child.stdio[4] as Readable;
  const cmdPipe = (child.stdio as unknown as Array<Writable | null>)[5]!;
  for (const [pipe, data] of [
    [argsPipe, nulJoin(options)],
    [cmdPipe, nulJoin(command)],
  ] as const) {
    pipe.on('error', () => {});
    pipe.end(data);
  }
  let status = '';
  statusPipe.setEncoding('utf8');
  statusPipe.on('data', (d: string) => {
    status += d;
  });
  statusPipe.on('error', () => {});
  let exitedFlag = false;
  const kill = (): void => {
    if (exitedFlag || child.pid === undefined) return;
    try {
      process.kill(-child.pid, 'SIGKILL');
    } catch {
      try {
        child.kill('SIGKILL');
      } catch {
        // already gone
      }
    }
  };
  const exited = new Promise<SandboxExit>((resolve) => {
    child.on('error', (err) => {
      exitedFlag = true;
      status += `\n{"spawn-error": ${JSON.stringify(err.message)}}`;
      resolve({ code: null, signal: null, started: false, swept: false });
    });
    child.on('exit', (code, signal) => {
      exitedFlag = true;
      // Let the status pipe drain (bwrap wrote it before exiting).
      // bwrap writes `{ "exit-code": N }` only when the builder itself ran and exited (not on setup failure).
      const done = (): void => {
        const m = /"exit-code"\s*:\s*(\d+)/.exec(status);
        resolve({ code: m ? Number(m[1]) : code, signal, started: m !== null, swept: signal === null });
      };
      if (statusPipe.readableEnded || statusPipe.destroyed) done();
      else {
        statusPipe.once('close', done);
        setTimeout(done, 200).unref();
      }
    });
  });
  const output = child.stdout as Readable;
  return { child, output, exited, kill };
}

/**
 * SIGKILL every process on the machine whose real, effective or saved uid is `uid` (the slot uid, used by nothing
 * else), until none is left or `timeoutMs` has passed. Returns the number of distinct processes signalled; throws if
 * some survive.
 */
export async function killUidProcesses(uid: number, timeoutMs = 2000): Promise<number> {
  const signalled = new Set<number>();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const pids = processesOfUid(uid);
    if (pids.length === 0) return signalled.size;
    if (Date.now() > deadline) {
      throw new SandboxError(`processes of build uid ${uid} survive SIGKILL: ${pids.join(', ')}`);
    }
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
        signalled.add(pid);
      } catch {
        // raced with its exit
      }
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Pids of live (non-zombie) processes running with `uid` as real, effective or saved uid. */
export function processesOfUid(uid: number): number[] {
  return processesOfUids((u) => u === uid).map((p) => p.pid);
}

/** Live (non-zombie) processes with a real, effective or saved uid for which `match` holds (with that uid). */
export function processesOfUids(match: (uid: number) => boolean): Array<{ pid: number; uid: number }> {
  const out: Array<{ pid: number; uid: number }> = [];
  let entries: string[];
  try {
    entries = readdirSync('/proc');
  } catch {
    return out;
  }
  for (const e of entries) {
    if (!/^[0-9]+$/.test(e)) continue;
    let status: string;
    try {
      status = readFileSync(`/proc/${e}/status`, 'utf8');
    } catch {
      continue;
    }
    const state = /^State:\s+(\S)/m.exec(status)?.[1];
    if (state === 'Z' || state === 'X') continue;
    const m = /^Uid:\s+(\d+)\s+(\d+)\s+(\d+)/m.exec(status);
    if (!m) continue;
    const uid = [m[1], m[2], m[3]].map(Number).find(match);
    if (uid !== undefined) out.push({ pid: Number(e), uid });
  }
  return out;
}
