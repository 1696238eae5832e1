/**
 * NAR throughput: builds a tree of mixed file sizes (default ~1 GiB) in a temp dir, then measures
 *  - write + hash: `dumpPath` → sha256 (`NarHasher`), and
 *  - read + extract + hash: NAR file → `fs.createReadStream` (64 KiB chunks, like a socket) → `WireReader` →
 *    `restoreNar` (which hashes as it goes and extracts into a fresh directory),
 * each `repeat` times (best and median reported), with peak RSS sampled during each phase. The tree and the NAR are
 * freshly written, so reads come from the page cache; the extraction target's file system matters a lot (`dir`).
 * Optionally the same work by Nix 2.8 for reference, alternating with ours (`nix-hash --type sha256`, and
 * `nix-store --restore`, which does not hash).
 *
 * Run standalone: `node --expose-gc dist/bench/nar.js [sizeMiB] [--dir DIR] [--repeat N] [--nix] [--source-chunk B]
 * [--json FILE | --no-json]` (also `npm run bench -- nar …`); results go to bench/results/nar-<date>.json.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { dumpPath, NarHasher, type NarSummary, restoreNar } from '../src/nar.js';
import { WireReader } from '../src/wire.js';

export interface NarBenchOptions {
  /** Total bytes of file contents (default 1 GiB). */
  totalBytes?: number;
  /** Where to build the temp tree (default os.tmpdir()). */
  dir?: string;
  /** Chunk size of the NAR source for the read phase (default 64 KiB). */
  sourceChunk?: number;
  /** Print a table (default true). */
  print?: boolean;
  /** Seed for the tree's shape. */
  seed?: number;
  /** Runs of each phase (default 3). */
  repeat?: number;
  /** Also time Nix 2.8 doing the same (needs `nix-hash` and `nix-store` on PATH). */
  nixReference?: boolean;
}

export interface PhaseResult {
  /** Median over the runs. */
  seconds: number;
  /** NAR bytes per second / 1e6, from the median time. */
  mbPerSec: number;
  /** From the best run. */
  bestMbPerSec: number;
  /** Every run's time. */
  runs: number[];
  /** Peak RSS sampled during the phase, bytes. */
  peakRss: number;
  /** Peak RSS above the RSS at the start of the phase, bytes. */
  peakRssGrowth: number;
}

export interface NarBenchResult {
  narSize: number;
  files: number;
  dirs: number;
  symlinks: number;
  contentBytes: number;
  narHash: string;
  write: PhaseResult;
  read: PhaseResult;
  /** Nix 2.8 doing the same work (medians; `nix-store --restore` does not hash), when asked for. */
  nix?: { dumpHashSeconds: number; dumpHashMbPerSec: number; restoreSeconds: number; restoreMbPerSec: number };
  dir: string;
  sourceChunk: number;
}

function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * The tree: by bytes about 15% small files (0–12 KiB), 35% medium (64 KiB–1 MiB), 50% large (4–48 MiB), spread over
 * directories of up to 64 entries, three levels deep, with a symlink every 50 files and some executables.
 */
export function buildTree(root: string, total: number, seed: number) {
  const rnd = prng(seed);
  const pool = randomBytes(64 * 1024 * 1024);
  const slice = (n: number) => {
    const off = Math.floor(rnd() * (pool.length - n));
    return pool.subarray(off, off + n);
  };
  const sizes: number[] = [];
  const addClass = (budget: number, gen: () => number) => {
    let left = budget;
    while (left > 0) {
      const n = Math.min(left, gen());
      sizes.push(n);
      left -= n;
    }
  };
  addClass(total * 0.15, () => Math.floor(rnd() * 12 * 1024));
  addClass(total * 0.35, () => 64 * 1024 + Math.floor(rnd() * (1024 - 64) * 1024));
  addClass(total * 0.5, () => 4 * 1024 * 1024 + Math.floor(rnd() * 44 * 1024 * 1024));
  // Shuffle so that every directory has a mix.
  for (let i = sizes.length - 1; i > 0; i--) {
    const j = Math.floor(rnd() * (i + 1));
    [sizes[i], sizes[j]] = [sizes[j]!, sizes[i]!];
  }
  fs.mkdirSync(root);
  let symlinks = 0;
  const perDir = 64;
  let cur = root;
  let inDir = 0;
  let dirIndex = 0;
  for (let i = 0; i < sizes.length; i++) {
    if (inDir === perDir) {
      dirIndex++;
      const a = dirIndex % 8;
      const b = Math.floor(dirIndex / 8) % 8;
      const c = Math.floor(dirIndex / 64);
      cur = join(root, `lib${c}`, `pkg-${b}`, `mod.${a}`);
      fs.mkdirSync(cur, { recursive: true });
      inDir = 0;
    }
    const p = join(cur, `file-${i}${rnd() < 0.5 ? '.so' : '.py'}`);
    fs.writeFileSync(p, slice(sizes[i]!), { mode: rnd() < 0.1 ? 0o755 : 0o644 });
    inDir++;
    if (i % 50 === 0) {
      fs.symlinkSync(`file-${i}.so`, join(cur, `link-${i}`));
      symlinks++;
    }
  }
  // mkdir -p created the intermediate directories too.
  let allDirs = 0;
  const count = (d: string) => {
    allDirs++;
    for (const e of fs.readdirSync(d, { withFileTypes: true })) if (e.isDirectory()) count(join(d, e.name));
  };
  count(root);
  return { files: sizes.length, dirs: allDirs, symlinks, contentBytes: sizes.reduce((a, b) => a + b, 0) };
}

interface Measured<T> {
  value: T;
  seconds: number;
  peak: number;
  growth: number;
}

async function measure<T>(fn: () => Promise<T>): Promise<Measured<T>> {
  (globalThis as { gc?: () => void }).gc?.();
  const base = process.memoryUsage.rss();
  let peak = base;
  const timer = setInterval(() => {
    peak = Math.max(peak, process.memoryUsage.rss());
  }, 10);
  const t0 = process.hrtime.bigint();
  try {
    const value = await fn();
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    peak = Math.max(peak, process.memoryUsage.rss());
    return { value, seconds, peak, growth: peak - base };
  } finally {
    clearInterval(timer);
  }
}

function phaseOf(narSize: number, runs: Measured<unknown>[]): PhaseResult {
  const times = runs.map((r) => r.seconds).sort((a, b) => a - b);
  const median = times[Math.floor(times.length / 2)]!;
  return {
    seconds: median,
    mbPerSec: narSize / median / 1e6,
    bestMbPerSec: narSize / times[0]! / 1e6,
    runs: runs.map((r) => r.seconds),
    peakRss: Math.max(...runs.map((r) => r.peak)),
    peakRssGrowth: Math.max(...runs.map((r) => r.growth)),
  };
}

function timeNix(cmd: string, args: string[], input?: string): number {
  const t0 = process.hrtime.bigint();
  const fd = input === undefined ? 'ignore' : fs.openSync(input, 'r');
  try {
    const r = spawnSync(cmd, args, {
      stdio: [fd, 'ignore', 'pipe'],
      env: { ...process.env, NIX_REMOTE: '', NIX_CONFIG: 'experimental-features = nix-command' },
    });
    if (r.status !== 0) throw new Error(`${cmd} failed: ${r.stderr?.toString() ?? r.error?.message}`);
  } finally {
    if (typeof fd === 'number') fs.closeSync(fd);
  }
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

function makeWritable(p: string): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(p);
  } catch {
    return;
  }
  if (!st.isDirectory()) return;
  fs.chmodSync(p, 0o755);
  for (const n of fs.readdirSync(p)) makeWritable(join(p, n));
}

export async function benchNar(opts: NarBenchOptions = {}): Promise<NarBenchResult> {
  const total = opts.totalBytes ?? 1024 * 1024 * 1024;
  const dir = opts.dir ?? tmpdir();
  const work = fs.mkdtempSync(join(dir, 'buildbox-bench-nar-'));
  const print = opts.print ?? true;
  const repeat = Math.max(1, opts.repeat ?? 3);
  const sourceChunk = opts.sourceChunk ?? 64 * 1024;
  try {
    const tree = join(work, 'tree');
    if (print) console.log(`nar bench: building a ${(total / 2 ** 20).toFixed(0)} MiB tree in ${work} …`);
    const shape = buildTree(tree, total, opts.seed ?? 42);

    // write + hash (alternating with Nix's when asked, so that both see the same machine)
    const writes: Measured<NarSummary>[] = [];
    const nixDumps: number[] = [];
    for (let i = 0; i < repeat; i++) {
      writes.push(
        await measure(async () => {
          const h = new NarHasher();
          for await (const c of dumpPath(tree)) h.update(c);
          return h.digest();
        }),
      );
      if (opts.nixReference) nixDumps.push(timeNix('nix-hash', ['--type', 'sha256', tree]));
    }
    const { narHash, narSize } = writes[0]!.value;

    // The NAR as a file, the source for the read phase.
    const narFile = join(work, 'tree.nar');
    {
      const out = fs.createWriteStream(narFile);
      for await (const c of dumpPath(tree)) {
        if (!out.write(c)) await new Promise<void>((r) => out.once('drain', () => r()));
      }
      await new Promise<void>((res, rej) => out.end((e?: Error | null) => (e ? rej(e) : res())));
    }

    // read + extract + hash (the restored tree is removed between runs, outside the timing; alternating with Nix's
    // restore when asked: on ext4 a run right after a big deletion is slower, so both take turns being second)
    const reads: Measured<NarSummary>[] = [];
    const nixRestores: number[] = [];
    const nixRestore = () => {
      const nixDest = join(work, 'nix-restored');
      nixRestores.push(timeNix('nix-store', ['--restore', nixDest], narFile));
      fs.rmSync(nixDest, { recursive: true, force: true });
    };
    for (let i = 0; i < repeat; i++) {
      if (opts.nixReference && i % 2 === 0) nixRestore();
      const dest = join(work, `restored-${i}`);
      const r = await measure(async () => {
        const src = fs.createReadStream(narFile, { highWaterMark: sourceChunk });
        return restoreNar(new WireReader(src), dest, { expectEnd: true });
      });
      if (!r.value.narHash.equals(narHash) || r.value.narSize !== narSize) {
        throw new Error('nar bench: the restored NAR hash differs from the dumped one');
      }
      reads.push(r);
      makeWritable(dest);
      fs.rmSync(dest, { recursive: true, force: true });
      if (opts.nixReference && i % 2 === 1) nixRestore();
    }
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    let nix: NarBenchResult['nix'];
    if (opts.nixReference) {
      const dumpHashSeconds = median(nixDumps);
      const restoreSeconds = median(nixRestores);
      nix = {
        dumpHashSeconds,
        dumpHashMbPerSec: narSize / dumpHashSeconds / 1e6,
        restoreSeconds,
        restoreMbPerSec: narSize / restoreSeconds / 1e6,
      };
    }

    const result: NarBenchResult = {
      narSize,
      ...shape,
      narHash: narHash.toString('hex'),
      write: phaseOf(narSize, writes),
      read: phaseOf(narSize, reads),
      ...(nix ? { nix } : {}),
      dir,
      sourceChunk,
    };
    if (print) printTable(result);
    return result;
  } finally {
    makeWritable(work);
    fs.rmSync(work, { recursive: true, force: true });
  }
}

function printTable(r: NarBenchResult): void {
  const mib = (n: number) => `${(n / 2 ** 20).toFixed(0)} MiB`;
  console.log(
    `NAR of ${mib(r.narSize)}: ${r.files} files, ${r.dirs} directories, ${r.symlinks} symlinks ` +
      `(${mib(r.contentBytes)} of contents), in ${r.dir}; source chunks of ${r.sourceChunk} bytes`,
  );
  console.log('phase                      median    MB/s  best MB/s   peak RSS  RSS growth');
  const row = (name: string, seconds: number, mbs: number, best?: number, peak?: number, growth?: number) =>
    console.log(
      `${name.padEnd(24)} ${seconds.toFixed(2).padStart(6)} s ${mbs.toFixed(0).padStart(7)} ${(best === undefined ? '' : best.toFixed(0)).padStart(10)} ${(peak === undefined ? '' : mib(peak)).padStart(10)} ${(growth === undefined ? '' : mib(growth)).padStart(11)}`,
    );
  row(
    'write + hash (dumpPath)',
    r.write.seconds,
    r.write.mbPerSec,
    r.write.bestMbPerSec,
    r.write.peakRss,
    r.write.peakRssGrowth,
  );
  row(
    'read + extract + hash',
    r.read.seconds,
    r.read.mbPerSec,
    r.read.bestMbPerSec,
    r.read.peakRss,
    r.read.peakRssGrowth,
  );
  if (r.nix) {
    row('nix-hash (reference)', r.nix.dumpHashSeconds, r.nix.dumpHashMbPerSec);
    row('nix-store --restore (ref.)', r.nix.restoreSeconds, r.nix.restoreMbPerSec);
  }
}

function argValue(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const args = process.argv.slice(2);
  const mib = /^\d+$/.test(args[0] ?? '') ? Number(args[0]) : 1024;
  const haveNix = (() => {
    try {
      execFileSync('nix-store', ['--version'], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  })();
  benchNar({
    totalBytes: mib * 1024 * 1024,
    dir: argValue(args, '--dir'),
    repeat: Number(argValue(args, '--repeat') ?? 3),
    nixReference: args.includes('--nix') && haveNix,
    sourceChunk: Number(argValue(args, '--source-chunk') ?? 64 * 1024),
  })
    .then((r) => {
      if (args.includes('--no-json')) return;
      // dist/bench/nar.js (or bench/nar.ts) → <repo>/bench/results
      const here = dirname(fileURLToPath(import.meta.url));
      const repo = basename(dirname(here)) === 'dist' ? join(here, '..', '..') : join(here, '..');
      const file =
        argValue(args, '--json') ??
        join(repo, 'bench', 'results', `nar-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
      fs.mkdirSync(dirname(file), { recursive: true });
      fs.writeFileSync(file, `${JSON.stringify({ date: new Date().toISOString(), ...r }, null, 2)}\n`);
      console.log(`results: ${file}`);
    })
    .catch((e) => {
      console.error(e instanceof Error ? e.message : e);
      process.exitCode = 1;
    });
}
