/**
 * The workloads (issue 6), each one sample for one target and protocol, driven by the same Nix 2.8 client:
 * P1 `nix copy --to` / `--from` of a large closure (with P5, the box's peak RSS meanwhile), P2 `nix copy --to` of many
 * small paths, P3 one trivial remote build, P4 many clients building at once.
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Closure } from './gen.js';
import { lastLines, run } from './proc.js';
import { memOf, RssSampler, reapedChildrenCpuSeconds, resetPeak } from './procfs.js';
import { percentile, type Sample, type TargetName } from './report.js';

export type Proto = 'ssh' | 'ssh-ng';

export interface Target {
  name: TargetName;
  /** An ssh alias whose view of the box's store is empty (a new user; or the reference box after a GC). */
  freshHost(): Promise<string>;
  /** A stable ssh alias for `key` (the same box user every time). */
  host(key: string): string;
  /** Pids whose memory P5 samples, and whether their peak can be reset (one long-lived process). */
  memPids(): number[];
  singleProcess: boolean;
  /** CPU seconds used so far by the box's side (its process tree, finished children included). */
  cpuSeconds(): number;
  /** Wait until the box has finished (and reaped) what the last client command started, so its CPU is counted. */
  settle(): Promise<void>;
}

/**
 * Write back what earlier steps left dirty (half a gigabyte per P1 copy, the reference's GC) before a timed copy, so
 * that the kernel's writeback of one target's data does not throttle the other target's measurement.
 */
async function settleDisk(): Promise<void> {
  await run('sync', []);
}

/** Run `fn` and count the box's CPU seconds meanwhile. */
async function withCpu<T>(t: Target, fn: () => Promise<T>): Promise<{ r: T; cpu: number }> {
  const before = t.cpuSeconds();
  const r = await fn();
  await t.settle();
  return { r, cpu: t.cpuSeconds() - before };
}

export interface Ctx {
  dir: string;
  env: NodeJS.ProcessEnv;
  system: string;
  srcStore: string;
  big: Closure | null;
  small: Closure | null;
  helloDir: string;
  timeoutMs: number;
}

let seq = 0;
const uniq = () => `${Date.now().toString(36)}${(seq++).toString(36)}`;

const storeUri = (root: string) => `local?root=${root}`;

function failure(e: unknown): string {
  return lastLines((e as Error).message, 4).slice(0, 600);
}

/** A fresh client store, initialised (untimed) so that creating its database is not part of a measurement. */
async function freshClientStore(ctx: Ctx, name: string): Promise<string> {
  const root = join(ctx.dir, 'clients', `${name}-${uniq()}`);
  mkdirSync(root, { recursive: true });
  await run('nix', ['store', 'ping', '--store', storeUri(root)], { env: ctx.env });
  return root;
}

export interface P1Sample {
  up: Sample;
  down: Sample;
  rss: Sample;
  /** Box CPU seconds per GB (1e9 bytes of NAR) uploaded / downloaded. */
  upCpu: Sample;
  downCpu: Sample;
}

export async function p1(ctx: Ctx, t: Target, proto: Proto, rep: number): Promise<P1Sample> {
  const big = ctx.big!;
  const fail = (e: unknown): P1Sample => {
    const error = failure(e);
    const f = { rep, value: null, error };
    return { up: f, down: f, rss: f, upCpu: f, downCpu: f };
  };
  let host: string;
  let dst: string;
  try {
    host = await t.freshHost();
    dst = await freshClientStore(ctx, 'p1-down');
  } catch (e) {
    return fail(e);
  }
  const uri = `${proto}://${host}`;
  const mb = big.narBytes / 1e6;
  const out: P1Sample = {
    up: { rep, value: null },
    down: { rep, value: null },
    rss: { rep, value: null },
    upCpu: { rep, value: null },
    downCpu: { rep, value: null },
  };
  const gb = big.narBytes / 1e9;
  // Memory: the box's resident size just before, and its peak during the upload and during the download.
  const before = t.singleProcess ? Math.max(0, ...t.memPids().map((p) => memOf(p)?.rssKiB ?? 0)) / 1024 : null;
  const phase = async <T>(fn: () => Promise<T>): Promise<{ r: T; peakMiB: number; cpu: number }> => {
    await settleDisk();
    if (t.singleProcess) for (const pid of t.memPids()) resetPeak(pid);
    const sampler = new RssSampler(() => t.memPids(), t.singleProcess ? 20 : 100);
    sampler.start();
    try {
      const { r, cpu } = await withCpu(t, fn);
      return { r, cpu, peakMiB: sampler.stop() / 1024 };
    } finally {
      sampler.stop();
    }
  };
  let upPeak = 0;
  let downPeak = 0;
  try {
    const up = await phase(() =>
      run('nix', ['copy', '--no-check-sigs', '--from', storeUri(ctx.srcStore), '--to', uri, ...big.roots], {
        env: ctx.env,
        timeoutMs: ctx.timeoutMs,
      }),
    );
    upPeak = up.peakMiB;
    out.up = { rep, value: mb / up.r.seconds, extra: { seconds: up.r.seconds, host } };
    out.upCpu = { rep, value: up.cpu / gb };
    const down = await phase(() =>
      run('nix', ['copy', '--no-check-sigs', '--from', uri, '--to', storeUri(dst), ...big.roots], {
        env: ctx.env,
        timeoutMs: ctx.timeoutMs,
      }),
    );
    downPeak = down.peakMiB;
    out.down = { rep, value: mb / down.r.seconds, extra: { seconds: down.r.seconds } };
    out.downCpu = { rep, value: down.cpu / gb };
  } catch (e) {
    const error = failure(e);
    if (out.up.value === null) out.up = { rep, value: null, error };
    out.down = { rep, value: null, error };
  } finally {
    rmSync(dst, { recursive: true, force: true });
  }
  const peak = Math.max(upPeak, downPeak);
  out.rss = {
    rep,
    value: peak > 0 ? peak : null,
    extra: { beforeMiB: before, uploadPeakMiB: upPeak, downloadPeakMiB: downPeak },
  };
  return out;
}

export async function p2(ctx: Ctx, t: Target, proto: Proto, rep: number): Promise<{ time: Sample; cpu: Sample }> {
  const small = ctx.small!;
  try {
    const host = await t.freshHost();
    await settleDisk();
    const { r, cpu } = await withCpu(t, () =>
      run(
        'nix',
        ['copy', '--no-check-sigs', '--from', storeUri(ctx.srcStore), '--to', `${proto}://${host}`, ...small.roots],
        { env: ctx.env, timeoutMs: ctx.timeoutMs },
      ),
    );
    return {
      time: { rep, value: r.seconds, extra: { pathsPerSecond: small.all.length / r.seconds, host } },
      cpu: { rep, value: cpu },
    };
  } catch (e) {
    const f = { rep, value: null, error: failure(e) };
    return { time: f, cpu: f };
  }
}

/** hello-box.nix with its busybox, and an expression building `n` of them with fresh greetings. */
export function prepareHello(dir: string, sharedDir: string): string {
  const d = join(dir, 'hello');
  mkdirSync(join(d, 'bb', 'bin'), { recursive: true });
  copyFileSync(join(sharedDir, 'examples', 'hello-box.nix'), join(d, 'hello-box.nix'));
  if (!existsSync(join(d, 'bb', 'bin', 'busybox'))) {
    copyFileSync('/bin/busybox', join(d, 'bb', 'bin', 'busybox'));
    symlinkSync('busybox', join(d, 'bb', 'bin', 'sh'));
  }
  writeFileSync(
    join(d, 'many.nix'),
    // biome-ignore lint/suspicious/noTemplateCurlyInString: Nix string interpolation
    '{ salt, n }: builtins.genList (i: import ./hello-box.nix { greeting = "${salt}-${toString i}"; }) n\n',
  );
  return d;
}

interface BuildRun {
  seconds: number;
  /** Per build: ms from the client's start until the client finished that build (outputs copied back). */
  latenciesMs: number[];
  failures: number;
  error?: string;
}

/**
 * One `nix-build` of `n` hello-boxes on a remote builder only. Per-build completion times come from the client's
 * `--log-format internal-json` activities (type 105 = build, with the machine as second field).
 */
async function nixBuild(
  ctx: Ctx,
  clientStore: string,
  builder: string,
  salt: string,
  n: number,
  jobs: number,
): Promise<BuildRun> {
  const started = performance.now();
  const builds = new Map<number, string>();
  const stopped = new Map<string, number>();
  const r = await run(
    'nix-build',
    [
      join(ctx.helloDir, 'many.nix'),
      '--argstr',
      'salt',
      salt,
      '--arg',
      'n',
      String(n),
      '--no-out-link',
      '--keep-going',
      '--max-jobs',
      '0',
      '--builders',
      `${builder} ${ctx.system} - ${jobs} 1`,
      '--store',
      storeUri(clientStore),
      '--log-format',
      'internal-json',
    ],
    {
      env: ctx.env,
      allowFail: true,
      timeoutMs: ctx.timeoutMs,
      onStderrLine: (line, at) => {
        if (!line.startsWith('@nix {')) return;
        let ev: { action?: string; id?: number; type?: number; fields?: unknown[] };
        try {
          ev = JSON.parse(line.slice(5));
        } catch {
          return;
        }
        if (ev.action === 'start' && ev.type === 105 && typeof ev.fields?.[1] === 'string' && ev.fields[1] !== '') {
          builds.set(ev.id!, String(ev.fields[0]));
        } else if (ev.action === 'stop' && ev.id !== undefined && builds.has(ev.id)) {
          stopped.set(builds.get(ev.id)!, at - started);
        }
      },
    },
  );
  const outputs = r.stdout.split('\n').filter((l) => l.startsWith('/nix/store/'));
  if (r.code === 0 && outputs.length === n) {
    // Check what was built: each greeting file holds "<salt>-<i>".
    const greetings = new Set(
      outputs
        .map((o) => readFileSync(join(clientStore, o, 'greeting'), 'utf8').trim())
        .filter((g) => g.startsWith(salt)),
    );
    const bad = n - greetings.size;
    const lat = [...stopped.values()];
    // A build that succeeded without a client-side build activity (should not happen): count the whole run.
    while (lat.length < n) lat.push(r.seconds * 1000);
    return {
      seconds: r.seconds,
      latenciesMs: lat.slice(0, n),
      failures: bad,
      error: bad ? 'wrong build output' : undefined,
    };
  }
  // Which builds failed: the drvs whose outputs are not valid in the client store.
  let ok = 0;
  const lat: number[] = [];
  for (const [drv, ms] of stopped) {
    const q = await run('nix-store', ['--store', storeUri(clientStore), '-q', '--outputs', drv], {
      env: ctx.env,
      allowFail: true,
    });
    const outs = q.stdout.split('\n').filter((l) => l.startsWith('/nix/store/'));
    if (q.code === 0 && outs.length > 0 && outs.every((o) => existsSync(join(clientStore, o)))) {
      ok++;
      lat.push(ms);
    }
  }
  return { seconds: r.seconds, latenciesMs: lat, failures: n - ok, error: lastLines(r.stderr, 4).slice(0, 600) };
}

export function p3Store(ctx: Ctx): string {
  const root = join(ctx.dir, 'clients', 'p3');
  mkdirSync(root, { recursive: true });
  return root;
}

/** P3: one remote build, time from `nix-build` start to result (and the box's CPU seconds for it). */
export async function p3(ctx: Ctx, t: Target, proto: Proto, rep: number): Promise<{ time: Sample; cpu: Sample }> {
  try {
    const { r: b, cpu } = await withCpu(t, () =>
      nixBuild(ctx, p3Store(ctx), `${proto}://${t.host(`p3-${proto}`)}`, `p3${uniq()}`, 1, 1),
    );
    if (b.failures > 0) {
      const f = { rep, value: null, error: b.error ?? 'build failed' };
      return { time: f, cpu: f };
    }
    return { time: { rep, value: b.seconds }, cpu: { rep, value: cpu } };
  } catch (e) {
    const f = { rep, value: null, error: failure(e) };
    return { time: f, cpu: f };
  }
}

export interface P4Result {
  p50: Sample;
  p95: Sample;
  failures: Sample;
  wall: Sample;
  cpu: Sample;
  /** CPU seconds of the client processes (nix-build, their build hooks and ssh), all reaped by the end. */
  clientsCpu: Sample;
}

/** P4: `clients` nix-builds at once, each building `builds` hello-boxes in parallel on its own box user. */
export async function p4(
  ctx: Ctx,
  t: Target,
  proto: Proto,
  rep: number,
  clients: number,
  builds: number,
): Promise<P4Result> {
  const stores = Array.from({ length: clients }, (_, i) => {
    const root = join(ctx.dir, 'clients', `p4-${i}`);
    mkdirSync(root, { recursive: true });
    return root;
  });
  const started = performance.now();
  const cpu0 = t.cpuSeconds();
  const clients0 = reapedChildrenCpuSeconds();
  const runs = await Promise.all(
    stores.map((store, i) =>
      nixBuild(ctx, store, `${proto}://${t.host(`p4-${proto}-${i}`)}`, `p4${uniq()}`, builds, builds).catch(
        (e): BuildRun => ({ seconds: 0, latenciesMs: [], failures: builds, error: failure(e) }),
      ),
    ),
  );
  const wall = (performance.now() - started) / 1000;
  const clientsCpu = reapedChildrenCpuSeconds() - clients0;
  await t.settle();
  const cpu = t.cpuSeconds() - cpu0;
  const lat = runs.flatMap((r) => r.latenciesMs).map((ms) => ms / 1000);
  const failures = runs.reduce((s, r) => s + r.failures, 0);
  const errors = runs.filter((r) => r.error).map((r) => r.error!);
  const extra = { builds: clients * builds, failures, errors: errors.slice(0, 3), latencies: lat };
  return {
    p50: { rep, value: percentile(lat, 50), extra },
    p95: { rep, value: percentile(lat, 95) },
    failures: { rep, value: failures, error: failures > 0 ? errors[0] : undefined },
    wall: { rep, value: wall },
    cpu: { rep, value: cpu },
    clientsCpu: { rep, value: clientsCpu },
  };
}
