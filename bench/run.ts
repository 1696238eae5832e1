/**
 * `npm run bench`: buildbox against the real Nix builder on the same machine, in the same run (issue 6).
 *
 *   npm run build && npm run bench                  # full run (P1–P5, ssh:// and ssh-ng://, 3 repetitions)
 *   npm run bench -- --quick                        # smoke run: small sizes, a couple of minutes
 *   npm run bench -- --workloads P2,P3 --reps 5     # some workloads, more repetitions
 *   npm run bench -- --profile                      # buildbox only, under node --cpu-prof, P1+P2; prints hot spots
 *   npm run bench -- nar [args]                     # the NAR micro-benchmark (bench/nar.ts)
 *
 * Every size is a flag or an environment variable (`--p1-mib 512` = `BENCH_P1_MIB=512`); `--help` lists them.
 * It reports, it never fails on a missed target; it exits non-zero only when the harness itself breaks.
 */
import { chmodSync, existsSync, mkdirSync, readdirSync, renameSync, writeFileSync } from 'node:fs';
import { availableParallelism, loadavg } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { type BuildboxBox, startBuildbox } from './buildbox-box.js';
import { bigClosure, importPaths, smallChains } from './gen.js';
import { machineInfo } from './machine.js';
import { benchTempDir, cleanupAll, installSignalHandlers, isAborted, run, sleep } from './proc.js';
import { cpuSecondsOf, descendantsOf } from './procfs.js';
import { analyzeProfile, formatProfile, type ProfileSummary } from './profile.js';
import { type ReferenceBox, startReferenceBox } from './reference-box.js';
import {
  goals,
  markdownTable,
  Results,
  type Results as ResultsT,
  rows,
  type Sample,
  summarize,
  type TargetName,
  textTable,
} from './report.js';
import { type Ctx, type Proto, p1, p2, p3, p4, prepareHello, type Target } from './workloads.js';

const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
/** dist/bench → repo root. */
export const REPO = join(BENCH_DIR, '..', '..');
const SHARED = join(REPO, '..', 'shared');

interface Options {
  reps: number;
  workloads: string[];
  protocols: Proto[];
  targets: TargetName[];
  p1Mib: number;
  p1Paths: number;
  p2Paths: number;
  p2Chain: number;
  p2Size: number;
  p3Reps: number;
  p4Clients: number;
  p4Builds: number;
  p4Reps: number;
  maxJobs: number;
  cipher: string;
  profile: boolean;
  keep: boolean;
  json: string | null;
  nar: boolean;
  logLevel: string;
  timeoutS: number;
  quick: boolean;
}

const NUMERIC: Array<[keyof Options, string, number, number, string]> = [
  // key, flag, default, quick default, help
  ['reps', 'reps', 3, 2, 'repetitions per workload, target and protocol (A/B alternating)'],
  ['p1Mib', 'p1-mib', 512, 64, 'P1 closure size in MiB'],
  ['p1Paths', 'p1-paths', 4, 2, 'P1 number of paths in the closure'],
  ['p2Paths', 'p2-paths', 2000, 200, 'P2 number of small paths'],
  ['p2Chain', 'p2-chain', 20, 20, 'P2 length of each reference chain'],
  ['p2Size', 'p2-size', 4096, 4096, 'P2 size of each small path in bytes'],
  ['p3Reps', 'p3-reps', 5, 3, 'P3 repetitions (single builds are cheap and noisy)'],
  ['p4Clients', 'p4-clients', 16, 4, 'P4 concurrent clients (each its own box user)'],
  ['p4Builds', 'p4-builds', 4, 2, 'P4 builds per client, at once'],
  ['p4Reps', 'p4-reps', 2, 1, 'P4 repetitions'],
  ['maxJobs', 'max-jobs', 64, 64, "buildbox's max-jobs"],
  ['timeoutS', 'timeout', 1800, 600, 'timeout of one client command, seconds'],
];

function usage(): string {
  let s = 'usage: npm run bench -- [options]   |   npm run bench -- nar [nar-bench args]\n\noptions:\n';
  s += '  --quick                 small sizes (a smoke run of a couple of minutes)\n';
  for (const [key, flag, def, q, help] of NUMERIC) {
    s += `  --${flag} N`.padEnd(26) + `${help} (default ${def}, quick ${q}; env BENCH_${envName(key)})\n`;
  }
  s += '  --workloads P1,P2,P3,P4 which workloads (P5 is measured during P1)\n';
  s += '  --protocols ssh,ssh-ng  which store protocols\n';
  s += '  --targets buildbox,reference\n';
  s += '  --cipher NAME           ssh cipher for both boxes (default aes128-gcm@openssh.com; "default": ssh\'s own)\n';
  s += '  --profile               run buildbox under node --cpu-prof for P1+P2 only and print the hot spots\n';
  s += '  --nar                   also run the NAR micro-benchmark (bench/nar.ts) at the end\n';
  s += '  --json FILE             where to write the results (default bench/results/<date>.json); --no-json: none\n';
  s += '  --keep                  keep the temp dir (stores, logs) for inspection\n';
  s += '  --log-level LEVEL       buildbox log level (default warn)\n';
  return s;
}

function envName(key: string): string {
  return key.replace(/[A-Z]/g, (c) => `_${c}`).toUpperCase();
}

function parseOptions(argv: string[]): Options {
  const numericOpts = Object.fromEntries(NUMERIC.map(([, flag]) => [flag, { type: 'string' as const }]));
  const { values } = parseArgs({
    args: argv,
    options: {
      ...numericOpts,
      quick: { type: 'boolean' },
      workloads: { type: 'string' },
      protocols: { type: 'string' },
      targets: { type: 'string' },
      cipher: { type: 'string' },
      profile: { type: 'boolean' },
      nar: { type: 'boolean' },
      json: { type: 'string' },
      'no-json': { type: 'boolean' },
      keep: { type: 'boolean' },
      'log-level': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    process.stdout.write(usage());
    process.exit(0);
  }
  const quick = Boolean(values.quick ?? process.env.BENCH_QUICK);
  const opts = { quick } as Options;
  for (const [key, flag, def, q] of NUMERIC) {
    const raw = (values as Record<string, unknown>)[flag] ?? process.env[`BENCH_${envName(key)}`];
    const v = raw === undefined ? (quick ? q : def) : Number(raw);
    if (!Number.isFinite(v) || v <= 0) throw new Error(`--${flag} must be a positive number, got ${String(raw)}`);
    (opts as unknown as Record<string, number>)[key] = v;
  }
  const list = (v: string | undefined, env: string | undefined, def: string) =>
    (v ?? env ?? def)
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
  opts.profile = Boolean(values.profile);
  opts.workloads = list(values.workloads, process.env.BENCH_WORKLOADS, opts.profile ? 'P1,P2' : 'P1,P2,P3,P4').map(
    (w) => w.toUpperCase(),
  );
  for (const w of opts.workloads) if (!/^P[1-5]$/.test(w)) throw new Error(`unknown workload ${w}`);
  opts.protocols = list(values.protocols, process.env.BENCH_PROTOCOLS, 'ssh,ssh-ng') as Proto[];
  for (const p of opts.protocols) if (p !== 'ssh' && p !== 'ssh-ng') throw new Error(`unknown protocol ${p}`);
  opts.targets = list(
    values.targets,
    process.env.BENCH_TARGETS,
    opts.profile ? 'buildbox' : 'buildbox,reference',
  ) as TargetName[];
  for (const t of opts.targets) if (t !== 'buildbox' && t !== 'reference') throw new Error(`unknown target ${t}`);
  opts.cipher = values.cipher ?? process.env.BENCH_CIPHER ?? 'aes128-gcm@openssh.com';
  opts.keep = Boolean(values.keep);
  opts.nar = Boolean(values.nar);
  opts.logLevel = values['log-level'] ?? 'warn';
  const stamp = new Date().toISOString().replace(/:/g, '-').replace(/\..*/, '');
  opts.json = values['no-json']
    ? null
    : (values.json ?? join(REPO, 'bench', 'results', `${stamp}${opts.profile ? '-profile' : ''}.json`));
  return opts;
}

function log(msg: string): void {
  process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);
}

function clientEnv(dir: string, sshConfig: string): NodeJS.ProcessEnv {
  return {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    HOME: process.env.HOME ?? '/root',
    NIX_REMOTE: '',
    NIX_STATE_DIR: join(dir, 'client-state'),
    NIX_CONFIG: 'experimental-features = nix-command\nsubstituters =\nsandbox = false\n',
    NIX_SSHOPTS: `-F ${sshConfig}`,
  };
}

function defineMetrics(results: ResultsT, o: Options): void {
  for (const proto of o.protocols) {
    if (o.workloads.includes('P1')) {
      results.metric(`P1-up-${proto}`, {
        workload: 'P1',
        proto,
        label: `copy --to ${o.p1Mib} MiB`,
        unit: 'MB/s',
        better: 'higher',
        goal: goals.atLeastRef({ min: 300, unit: 'MB/s' }),
      });
      results.metric(`P1-down-${proto}`, {
        workload: 'P1',
        proto,
        label: `copy --from ${o.p1Mib} MiB`,
        unit: 'MB/s',
        better: 'higher',
        goal: goals.atLeastRef(),
      });
      results.metric(`P1-upcpu-${proto}`, {
        workload: 'P1',
        proto,
        label: 'copy --to: box CPU',
        unit: 'CPU s/GB',
        better: 'lower',
      });
      results.metric(`P1-downcpu-${proto}`, {
        workload: 'P1',
        proto,
        label: 'copy --from: box CPU',
        unit: 'CPU s/GB',
        better: 'lower',
      });
    }
  }
  for (const proto of o.protocols) {
    if (o.workloads.includes('P2')) {
      results.metric(`P2-${proto}`, {
        workload: 'P2',
        proto,
        label: `copy --to ${o.p2Paths} × ${o.p2Size} B`,
        unit: 's',
        better: 'lower',
        goal: goals.atMostRef(0.8),
      });
      results.metric(`P2-cpu-${proto}`, { workload: 'P2', proto, label: 'box CPU', unit: 'CPU s', better: 'lower' });
    }
  }
  for (const proto of o.protocols) {
    if (o.workloads.includes('P3')) {
      results.metric(`P3-${proto}`, {
        workload: 'P3',
        proto,
        label: 'one remote build',
        unit: 's',
        better: 'lower',
        goal: goals.atMostRef(1.0),
      });
      results.metric(`P3-cpu-${proto}`, {
        workload: 'P3',
        proto,
        label: 'one remote build: box CPU',
        unit: 'CPU s',
        better: 'lower',
      });
    }
  }
  for (const proto of o.protocols) {
    if (o.workloads.includes('P4')) {
      const n = `${o.p4Clients}×${o.p4Builds}`;
      results.metric(`P4-fail-${proto}`, {
        workload: 'P4',
        proto,
        label: `${n} builds: failures`,
        unit: 'count',
        better: 'lower',
        goal: goals.atMost(0, 'count'),
      });
      results.metric(`P4-p50-${proto}`, {
        workload: 'P4',
        proto,
        label: `${n}: p50 latency`,
        unit: 's',
        better: 'lower',
      });
      results.metric(`P4-p95-${proto}`, {
        workload: 'P4',
        proto,
        label: `${n}: p95 latency`,
        unit: 's',
        better: 'lower',
      });
      results.metric(`P4-lone-${proto}`, {
        workload: 'P4',
        proto,
        label: `${n}: p95 / lone build (P3)`,
        unit: '×',
        better: 'lower',
        goal: {
          text: 'bb ≤ 1.5',
          check: (bb) =>
            bb.median === null
              ? null
              : bb.median <= 1.5
                ? { ok: true, why: '' }
                : { ok: false, why: `${bb.median.toFixed(2)}` },
        },
      });
      results.metric(`P4-wall-${proto}`, {
        workload: 'P4',
        proto,
        label: `${n}: wall time`,
        unit: 's',
        better: 'lower',
      });
      results.metric(`P4-cpu-${proto}`, {
        workload: 'P4',
        proto,
        label: `${n}: box CPU`,
        unit: 'CPU s',
        better: 'lower',
      });
      results.metric(`P4-clients-${proto}`, {
        workload: 'P4',
        proto,
        label: `${n}: clients' CPU (nix-build, hooks, ssh)`,
        unit: 'CPU s',
        better: 'lower',
      });
      // The least p95 / lone build could be with a box that cost nothing: the clients share the machine's cores.
      results.metric(`P4-floor-${proto}`, {
        workload: 'P4',
        proto,
        label: `${n}: clients' CPU / ${availableParallelism()} cores / lone build`,
        unit: '×',
        better: 'lower',
      });
    }
  }
  if (o.workloads.includes('P1')) {
    for (const proto of o.protocols) {
      results.metric(`P5-${proto}`, {
        workload: 'P5',
        proto,
        label: 'peak RSS during P1 (ref: largest nix process)',
        unit: 'MiB',
        better: 'lower',
        goal: goals.below(150, 'MiB'),
      });
    }
  }
}

async function main(): Promise<number> {
  const argv = process.argv.slice(2);
  if (argv[0] === 'nar') return runNarBench(argv.slice(1));
  const o = parseOptions(argv);
  installSignalHandlers();
  const dir = benchTempDir('buildbox-bench-', o.keep);
  // buildbox's build users (unprivileged slot uids) must be able to reach its state dir inside.
  chmodSync(dir, 0o755);
  log(`temp dir ${dir}; workloads ${o.workloads.join(',')}; protocols ${o.protocols.join(',')}; reps ${o.reps}`);
  const machine = await machineInfo(REPO);
  const results = new Results();
  defineMetrics(results, o);
  const errors: string[] = [];
  const sshConfigFile = join(dir, 'ssh_config');
  const env = clientEnv(dir, sshConfigFile);
  mkdirSync(join(dir, 'client-state'), { recursive: true });

  // Test data first (client side only), so that a broken generator stops the run before any box starts.
  const srcStore = join(dir, 'clients', 'src');
  mkdirSync(srcStore, { recursive: true });
  const ctx: Ctx = {
    dir,
    env,
    system: process.arch === 'arm64' ? 'aarch64-linux' : 'x86_64-linux',
    srcStore,
    big: null,
    small: null,
    helloDir: prepareHello(dir, SHARED),
    timeoutMs: o.timeoutS * 1000,
  };
  // Fresh paths for every protocol and repetition: buildbox keeps what earlier repetitions uploaded (for other users;
  // contents are stored once), the reference is emptied by a GC, so reusing them would measure buildbox copying
  // contents it already has. Both targets get the same paths in one repetition. The new paths are written back to
  // disk (sync) before anything is timed, so that their writeback does not run during a measurement.
  const makeBig = async (tag: string) => {
    const t0 = Date.now();
    ctx.big = bigClosure(o.p1Mib * 1024 * 1024, o.p1Paths, tag);
    await importPaths(`local?root=${srcStore}`, ctx.big.all, env);
    await run('sync', []);
    log(
      `P1 data ${tag}: ${o.p1Paths} paths, ${(ctx.big.narBytes / 1e6).toFixed(0)} MB of NAR, made in ${Date.now() - t0} ms`,
    );
  };
  const makeSmall = async (tag: string) => {
    const t0 = Date.now();
    ctx.small = smallChains(o.p2Paths, o.p2Chain, o.p2Size, tag);
    await importPaths(`local?root=${srcStore}`, ctx.small.all, env);
    await run('sync', []);
    log(`P2 data ${tag}: ${o.p2Paths} paths of ${o.p2Size} B in chains of ${o.p2Chain}, made in ${Date.now() - t0} ms`);
  };
  if (o.workloads.includes('P1')) await makeBig(`p1-${o.protocols[0]}-1`);
  if (o.workloads.includes('P2')) await makeSmall(`p2-${o.protocols[0]}-1`);

  // The boxes.
  const targets: Target[] = [];
  let bb: BuildboxBox | null = null;
  let ref: ReferenceBox | null = null;
  const profDir = join(dir, 'cpu-prof');
  const knownHosts: string[] = [];
  let sshConfig = '';
  if (o.targets.includes('buildbox')) {
    const perRep = o.protocols.length * o.reps;
    const users =
      (o.workloads.includes('P1') ? perRep : 0) +
      (o.workloads.includes('P2') ? perRep : 0) +
      o.protocols.length * (1 + o.p4Clients) +
      4;
    try {
      if (o.profile) mkdirSync(profDir, { recursive: true });
      bb = await startBuildbox(join(dir, 'buildbox'), {
        users,
        maxJobs: o.maxJobs,
        cpuProfDir: o.profile ? profDir : null,
        logLevel: o.logLevel,
      });
      log(`buildbox serve up: pid ${bb.pid}, port ${bb.port}, ${users} bench users`);
      knownHosts.push(bb.knownHostsLine);
      sshConfig += bb.sshConfig;
      const box = bb;
      const stable = new Map<string, string>();
      targets.push({
        name: 'buildbox',
        freshHost: async () => `box-${box.takeUser()}`,
        host: (key) => {
          let h = stable.get(key);
          if (!h) stable.set(key, (h = `box-${box.takeUser()}`));
          return h;
        },
        memPids: () => [box.pid],
        singleProcess: true,
        cpuSeconds: () => cpuSecondsOf(box.pid),
        settle: async () => {},
      });
    } catch (e) {
      const msg = `buildbox not available: ${(e as Error).message}`;
      errors.push(msg);
      log(msg);
    }
  }
  if (o.targets.includes('reference')) {
    try {
      ref = await startReferenceBox(join(dir, 'reference'));
      log(`reference box up: sshd pid ${ref.pid}, port ${ref.port}`);
      knownHosts.push(ref.knownHostsLine);
      sshConfig += ref.sshConfig;
      const r = ref;
      targets.push({
        name: 'reference',
        freshHost: async () => {
          await r.empty(env);
          return 'ref';
        },
        host: (key) => `ref-${key}`,
        memPids: () => r.nixPids(),
        singleProcess: false,
        // sshd's listener reaps each connection's sshd, which reaps its nix-store / nix-daemon.
        cpuSeconds: () => cpuSecondsOf(r.pid),
        settle: async () => {
          for (let i = 0; i < 100 && descendantsOf(r.pid).length > 0; i++) await sleep(20);
        },
      });
    } catch (e) {
      const msg = `reference box not available: ${(e as Error).message}`;
      errors.push(msg);
      log(msg);
    }
  }
  const knownHostsFile = join(dir, 'known_hosts');
  writeFileSync(knownHostsFile, `${knownHosts.join('\n')}\n`);
  sshConfig +=
    `Host *\n  UserKnownHostsFile ${knownHostsFile}\n  StrictHostKeyChecking yes\n  IdentitiesOnly yes\n` +
    `  BatchMode yes\n  LogLevel ERROR\n  Compression no\n  ConnectTimeout 30\n` +
    (o.cipher === 'default' ? '' : `  Ciphers ${o.cipher}\n`);
  writeFileSync(sshConfigFile, sshConfig);

  const order = (rep: number) => (rep % 2 === 0 ? targets : [...targets].reverse());
  const stop = () => isAborted();

  if (targets.length > 0) {
    for (const proto of o.protocols) {
      if (o.workloads.includes('P1') && !stop()) {
        for (let rep = 0; rep < o.reps && !stop(); rep++) {
          if (proto !== o.protocols[0] || rep > 0) await makeBig(`p1-${proto}-${rep + 1}`);
          for (const t of order(rep)) {
            const s = await p1(ctx, t, proto, rep);
            results.get(`P1-up-${proto}`)!.samples[t.name].push(s.up);
            results.get(`P1-down-${proto}`)!.samples[t.name].push(s.down);
            results.get(`P5-${proto}`)!.samples[t.name].push(s.rss);
            results.get(`P1-upcpu-${proto}`)!.samples[t.name].push(s.upCpu);
            results.get(`P1-downcpu-${proto}`)!.samples[t.name].push(s.downCpu);
            const m = s.rss.extra as { beforeMiB: number | null; uploadPeakMiB: number; downloadPeakMiB: number };
            log(
              `P1 ${proto} ${t.name} #${rep + 1}: up ${show(s.up, 'MB/s')}, down ${show(s.down, 'MB/s')}, ` +
                `peak RSS ${m.uploadPeakMiB.toFixed(0)} MiB up / ${m.downloadPeakMiB.toFixed(0)} MiB down, ` +
                `box CPU ${show(s.upCpu, 's/GB')} up / ${show(s.downCpu, 's/GB')} down` +
                (m.beforeMiB !== null ? ` (${m.beforeMiB.toFixed(0)} MiB before)` : ''),
            );
          }
        }
      }
    }
    for (const proto of o.protocols) {
      if (o.workloads.includes('P2') && !stop()) {
        for (let rep = 0; rep < o.reps && !stop(); rep++) {
          if (proto !== o.protocols[0] || rep > 0) await makeSmall(`p2-${proto}-${rep + 1}`);
          for (const t of order(rep)) {
            const s = await p2(ctx, t, proto, rep);
            results.get(`P2-${proto}`)!.samples[t.name].push(s.time);
            results.get(`P2-cpu-${proto}`)!.samples[t.name].push(s.cpu);
            log(`P2 ${proto} ${t.name} #${rep + 1}: ${show(s.time, 's')}, box CPU ${show(s.cpu, 's')}`);
          }
        }
      }
    }
    for (const proto of o.protocols) {
      if (o.workloads.includes('P3') && !stop()) {
        for (const t of targets) {
          const w = await p3(ctx, t, proto, -1);
          log(`P3 ${proto} ${t.name} warm-up (uploads busybox): ${show(w.time, 's')}`);
        }
        for (let rep = 0; rep < o.p3Reps && !stop(); rep++) {
          for (const t of order(rep)) {
            const s = await p3(ctx, t, proto, rep);
            results.get(`P3-${proto}`)!.samples[t.name].push(s.time);
            results.get(`P3-cpu-${proto}`)!.samples[t.name].push(s.cpu);
            log(`P3 ${proto} ${t.name} #${rep + 1}: ${show(s.time, 's')}, box CPU ${show(s.cpu, 's')}`);
          }
        }
      }
    }
    for (const proto of o.protocols) {
      if (o.workloads.includes('P4') && !stop()) {
        for (const t of targets) {
          const w = await p4(ctx, t, proto, -1, o.p4Clients, 1);
          log(
            `P4 ${proto} ${t.name} warm-up (${o.p4Clients} clients × 1): ${show(w.wall, 's')} wall, ${w.failures.value} failures`,
          );
        }
        for (let rep = 0; rep < o.p4Reps && !stop(); rep++) {
          for (const t of order(rep)) {
            const s = await p4(ctx, t, proto, rep, o.p4Clients, o.p4Builds);
            results.get(`P4-fail-${proto}`)!.samples[t.name].push(s.failures);
            results.get(`P4-p50-${proto}`)!.samples[t.name].push(s.p50);
            results.get(`P4-p95-${proto}`)!.samples[t.name].push(s.p95);
            results.get(`P4-wall-${proto}`)!.samples[t.name].push(s.wall);
            results.get(`P4-cpu-${proto}`)!.samples[t.name].push(s.cpu);
            results.get(`P4-clients-${proto}`)!.samples[t.name].push(s.clientsCpu);
            const lone = summarize(results.get(`P3-${proto}`)?.samples[t.name] ?? []).median;
            results.get(`P4-floor-${proto}`)!.samples[t.name].push({
              rep,
              value: lone && s.clientsCpu.value !== null ? s.clientsCpu.value / availableParallelism() / lone : null,
            });
            results.get(`P4-lone-${proto}`)!.samples[t.name].push({
              rep,
              value: lone && s.p95.value !== null ? s.p95.value / lone : null,
            });
            log(
              `P4 ${proto} ${t.name} #${rep + 1}: failures ${s.failures.value}, p50 ${show(s.p50, 's')}, p95 ${show(s.p95, 's')}, wall ${show(s.wall, 's')}` +
                (s.failures.error ? ` (${s.failures.error})` : ''),
            );
          }
        }
      }
    }
  }

  // Stop buildbox before reading its profile (it is written when the process exits).
  if (bb) await bb.stop();
  if (ref) await ref.stop();
  let profile: ProfileSummary | null = null;
  if (o.profile && existsSync(profDir)) {
    const files = readdirSync(profDir).filter((f) => f.endsWith('.cpuprofile'));
    if (files.length === 0) errors.push('no CPU profile was written (did buildbox exit cleanly?)');
    else {
      profile = analyzeProfile(join(profDir, files[0]!), join(REPO));
      process.stdout.write(`\n${formatProfile(profile)}\n`);
      if (o.json) {
        const keepAs = o.json.replace(/\.json$/, '.cpuprofile');
        mkdirSync(dirname(keepAs), { recursive: true });
        renameSync(join(profDir, files[0]!), keepAs);
        log(`CPU profile saved as ${keepAs}`);
      }
    }
  }

  const rs = rows(results);
  process.stdout.write(`\n${textTable(rs)}\n`);
  if (errors.length) process.stdout.write(`\nproblems:\n${errors.map((e) => `  - ${e}`).join('\n')}\n`);
  const setup =
    `${machine.cpu.model}, ${machine.cpu.cores} cores, ${machine.memoryGiB} GiB; Node ${machine.versions.node}, ` +
    `${machine.versions.nix}, ${machine.versions.openssh}; cipher ${o.cipher}; reps ${o.reps} ` +
    `(P3 ${o.p3Reps}, P4 ${o.p4Reps}); load average ${machine.loadAtStart} at start, ${loadavg()[0]!.toFixed(2)} at end; commit ${machine.git.commit.slice(0, 10)}${machine.git.dirty ? '+dirty' : ''}`;
  process.stdout.write(`\n${setup}\n`);

  if (o.json) {
    const out = {
      date: new Date().toISOString(),
      loadAtEnd: Math.round(loadavg()[0]! * 100) / 100,
      options: o,
      machine,
      problems: errors,
      table: rs,
      markdown: markdownTable(rs),
      metrics: results.metrics.map((m) => ({
        id: m.id,
        workload: m.workload,
        proto: m.proto,
        label: m.label,
        unit: m.unit,
        better: m.better,
        goal: m.goal?.text ?? null,
        buildbox: { summary: summarize(m.samples.buildbox), samples: m.samples.buildbox },
        reference: { summary: summarize(m.samples.reference), samples: m.samples.reference },
      })),
      profile,
    };
    mkdirSync(dirname(o.json), { recursive: true });
    writeFileSync(`${o.json}.tmp`, `${JSON.stringify(out, null, 2)}\n`);
    renameSync(`${o.json}.tmp`, o.json);
    log(`results written to ${o.json}`);
  }
  await cleanupAll();
  if (o.keep) log(`--keep: kept ${dir}`);
  if (o.nar && !isAborted()) await runNarBench([]);
  return 0;
}

function show(s: Sample, unit: string): string {
  if (s.value === null) return `FAILED (${s.error ?? '?'})`;
  return `${s.value.toFixed(s.value >= 100 ? 0 : 2)} ${unit}`;
}

/** The NAR micro-benchmark written by the NAR work (bench/nar.ts), run as its own process. */
async function runNarBench(args: string[]): Promise<number> {
  const js = join(BENCH_DIR, 'nar.js');
  if (!existsSync(js)) {
    process.stderr.write(`bench: ${js} is missing (bench/nar.ts not written yet, or npm run build not run)\n`);
    return 1;
  }
  const { spawnSync } = await import('node:child_process');
  const r = spawnSync(process.execPath, ['--expose-gc', js, ...args], { stdio: 'inherit' });
  return r.status ?? 1;
}

main().then(
  async (code) => {
    process.exitCode = code;
  },
  async (e: Error) => {
    process.stderr.write(`bench: ${e.message}\n`);
    await cleanupAll();
    process.exitCode = 1;
  },
);
