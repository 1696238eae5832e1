/**
 * Processes and cleanup for the benchmark: every child runs in its own process group and is tracked, so an error or a
 * Ctrl-C kills all of them (nix, ssh, sshd, buildbox) and removes every temp dir before the harness exits.
 */
import { type ChildProcess, type SpawnOptions, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';

type CleanupFn = () => void | Promise<void>;

const cleanups: Array<{ name: string; fn: CleanupFn }> = [];
const children = new Set<ChildProcess>();
let cleaningUp = false;
let aborted = false;

/** True once Ctrl-C / SIGTERM was received: long loops should stop starting new work. */
export function isAborted(): boolean {
  return aborted;
}

/** Run `fn` at cleanup time (reverse order of registration). Returns a function that unregisters it. */
export function onCleanup(name: string, fn: CleanupFn): () => void {
  const entry = { name, fn };
  cleanups.push(entry);
  return () => {
    const i = cleanups.indexOf(entry);
    if (i >= 0) cleanups.splice(i, 1);
  };
}

/** Kill a tracked child's whole process group. */
export function killGroup(child: ChildProcess, signal: NodeJS.Signals = 'SIGKILL'): void {
  if (child.pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  try {
    process.kill(-child.pid, signal);
  } catch {
    try {
      child.kill(signal);
    } catch {
      // already gone
    }
  }
}

export async function cleanupAll(): Promise<void> {
  if (cleaningUp) return;
  cleaningUp = true;
  for (const c of children) killGroup(c);
  while (cleanups.length > 0) {
    const { name, fn } = cleanups.pop()!;
    try {
      await fn();
    } catch (e) {
      process.stderr.write(`bench: cleanup of ${name} failed: ${(e as Error).message}\n`);
    }
  }
  for (const c of children) killGroup(c);
}

/** Install Ctrl-C / SIGTERM / crash handlers that clean up and exit. */
export function installSignalHandlers(): void {
  const onSignal = (sig: NodeJS.Signals) => {
    if (aborted) return;
    aborted = true;
    process.stderr.write(`\nbench: ${sig}: stopping every process and removing temp dirs…\n`);
    cleanupAll().finally(() => process.exit(sig === 'SIGINT' ? 130 : 143));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);
  process.on('uncaughtException', (e) => {
    process.stderr.write(`bench: internal error: ${e.stack ?? e.message}\n`);
    cleanupAll().finally(() => process.exit(1));
  });
}

/** A temp dir removed at cleanup (unless `keep`). */
export function benchTempDir(prefix: string, keep = false): string {
  const path = mkdtempSync(join(tmpdir(), prefix));
  if (!keep) onCleanup(`temp dir ${path}`, () => rmSync(path, { recursive: true, force: true }));
  return path;
}

/** Spawn a tracked child in its own process group. */
export function spawnTracked(cmd: string, args: string[], opts: SpawnOptions = {}): ChildProcess {
  const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], ...opts, detached: true });
  children.add(child);
  child.on('exit', () => children.delete(child));
  child.on('error', () => children.delete(child));
  return child;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  /** Wall time from spawn to exit, in seconds. */
  seconds: number;
}

export interface RunOpts {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  input?: string | Buffer;
  timeoutMs?: number;
  allowFail?: boolean;
  /** Called with each stderr line and the time (performance.now(), ms) it arrived. */
  onStderrLine?: (line: string, atMs: number) => void;
  /** Keep at most this many bytes of stderr (the tail); default 64 KiB. */
  keepStderr?: number;
}

/** Run a command to completion, timing it. Throws on non-zero exit unless allowFail. */
export function run(cmd: string, args: string[], opts: RunOpts = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawnTracked(cmd, args, { env: opts.env ?? process.env, cwd: opts.cwd });
    const out: Buffer[] = [];
    let err = '';
    const keep = opts.keepStderr ?? 64 * 1024;
    let partial = '';
    child.stdout!.on('data', (d: Buffer) => out.push(d));
    child.stderr!.setEncoding('utf8');
    child.stderr!.on('data', (d: string) => {
      err += d;
      if (err.length > keep * 2) err = err.slice(-keep);
      if (opts.onStderrLine) {
        const now = performance.now();
        partial += d;
        let nl = partial.indexOf('\n');
        while (nl >= 0) {
          opts.onStderrLine(partial.slice(0, nl), now);
          partial = partial.slice(nl + 1);
          nl = partial.indexOf('\n');
        }
      }
    });
    const timer = setTimeout(() => killGroup(child), opts.timeoutMs ?? 30 * 60_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`cannot run ${cmd}: ${e.message}`));
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const seconds = (performance.now() - started) / 1000;
      if (partial && opts.onStderrLine) opts.onStderrLine(partial, performance.now());
      const res: RunResult = {
        code: code ?? 128,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: err.slice(-keep),
        seconds,
      };
      if (res.code !== 0 && !opts.allowFail) {
        reject(new Error(`${cmd} ${args.join(' ')} exited ${code ?? signal}: ${lastLines(res.stderr, 6)}`));
      } else resolve(res);
    });
    child.stdin!.on('error', () => {});
    child.stdin!.end(opts.input ?? '');
  });
}

/** The last few non-empty lines of a tool's stderr, joined for a one-line message. */
export function lastLines(text: string, n: number): string {
  return text
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l.length > 0)
    .slice(-n)
    .join(' | ');
}

/** Wait for a child to exit, up to `ms`; true if it exited. */
export function waitExit(child: ChildProcess, ms: number): Promise<boolean> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve(true);
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(false), ms);
    child.once('exit', () => {
      clearTimeout(t);
      resolve(true);
    });
  });
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** A free TCP port on 127.0.0.1 (bound and released; the tiny race is acceptable for a benchmark). */
export async function freePort(): Promise<number> {
  const { createServer } = await import('node:net');
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      s.close(() => resolve(port));
    });
  });
}

/** Run async tasks with at most `limit` at once. */
export async function pool<T>(items: T[], limit: number, fn: (item: T, i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const workers = Array.from({ length: Math.min(limit, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i]!, i);
    }
  });
  await Promise.all(workers);
}
