/**
 * NAR writer and reader against the real Nix 2.8: spec §4.2 vectors, randomised trees with odd names, byte-for-byte
 * equality with `nix-store --dump`, hashes equal to `nix-hash`, round trips through `restoreNar` and
 * `nix-store --restore`, canonical metadata of restored trees, streaming and stream-position behaviour.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import ts from 'typescript';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dumpPath, dumpPathToBuffer, NarDumpError, NarHasher, narHashPath, parseNar, restoreNar } from '../src/nar.js';
import { encodeString, WireReader } from '../src/wire.js';
import { run, runBuffer, tempDir } from './helpers/exec.js';
import { nix28, nixEnv, REPO } from './helpers/nix.js';

// ---------------------------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------------------------

/** A WireReader over `data`, delivered in chunks of the given sizes (cycled), to exercise every boundary. */
function readerOf(data: Buffer, sizes: number[] = [data.length || 1]): WireReader {
  async function* gen() {
    let off = 0;
    let i = 0;
    while (off < data.length) {
      const n = Math.max(1, sizes[i++ % sizes.length]!);
      yield data.subarray(off, off + n);
      off += n;
    }
  }
  return new WireReader(gen());
}

async function nixDump(path: string): Promise<Buffer> {
  return runBuffer('nix-store', ['--dump', path], nixEnv());
}

async function nixHash(path: string): Promise<string> {
  return (await nix28('nix-hash', ['--type', 'sha256', path])).stdout.trim();
}

async function nixRestore(nar: Buffer, dest: string): Promise<void> {
  await nix28('nix-store', ['--restore', dest], { input: nar });
}

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Seeded PRNG (mulberry32). */
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

/** Entry names chosen so that bytewise order differs from JS string order, with odd and non-UTF-8 bytes. */
const NAMES: Buffer[] = [
  'a',
  'b',
  'A',
  'Z',
  '_',
  '-',
  '-rf',
  '.hidden',
  '..x',
  '...',
  ' space',
  'tab\there',
  'nl\nx',
  'ü',
  'ɐ',
  '😀',
  '\uff61',
  '0',
  '10',
  '9',
  'a.b',
  'x'.repeat(200),
  'quote"\\',
  '~',
  '\x7f',
  '\x01ctl',
].map((s) => Buffer.from(s));
NAMES.push(Buffer.from([0xff, 0xfe]), Buffer.from([0x80]), Buffer.from([0xc3, 0x28]), Buffer.from([0x61, 0xe9]));

const TARGETS: Buffer[] = [
  'a',
  '../x',
  '/nix/store/00000000000000000000000000000000-dangling',
  'does-not-exist',
  '.',
  '..',
  '/',
  'ü/😀',
  'sp ace',
  'y'.repeat(1000),
].map((s) => Buffer.from(s));
TARGETS.push(Buffer.from([0xff, 0x2f, 0x01]));

function join2(dir: Buffer, name: Buffer): Buffer {
  return Buffer.concat([dir, Buffer.from('/'), name]);
}

function fileBytes(rnd: () => number): Buffer {
  const r = rnd();
  let n: number;
  if (r < 0.15) n = 0;
  else if (r < 0.45) n = [1, 7, 8, 9, 15, 16, 17][Math.floor(rnd() * 7)]!;
  else if (r < 0.93) n = Math.floor(rnd() * 5000);
  else if (r < 0.98) n = 60_000 + Math.floor(rnd() * 300_000);
  else n = 1_000_000 + Math.floor(rnd() * 1_500_000);
  const b = Buffer.allocUnsafe(n);
  let i = 0;
  for (; i + 4 <= n; i += 4) b.writeUInt32LE(Math.floor(rnd() * 4294967296), i);
  for (; i < n; i++) b[i] = Math.floor(rnd() * 256);
  return b;
}

function makeFile(path: Buffer, rnd: () => number): void {
  fs.writeFileSync(path, fileBytes(rnd));
  fs.chmodSync(path, rnd() < 0.3 ? 0o755 : rnd() < 0.5 ? 0o644 : 0o600);
}

function makeSymlink(path: Buffer, rnd: () => number): void {
  fs.symlinkSync(TARGETS[Math.floor(rnd() * TARGETS.length)]!, path);
}

function makeDir(path: Buffer, rnd: () => number, depth: number, budget: { n: number }): void {
  fs.mkdirSync(path);
  if (depth > 6 || budget.n <= 0) return;
  const count = rnd() < 0.15 ? 0 : Math.floor(rnd() * 9);
  const used = new Set<string>();
  for (let i = 0; i < count && budget.n > 0; i++) {
    const name = NAMES[Math.floor(rnd() * NAMES.length)]!;
    if (used.has(name.toString('hex'))) continue;
    used.add(name.toString('hex'));
    budget.n--;
    const child = join2(path, name);
    const r = rnd();
    if (r < 0.55) makeFile(child, rnd);
    else if (r < 0.75) makeSymlink(child, rnd);
    else makeDir(child, rnd, depth + 1, budget);
  }
  if (rnd() < 0.3) fs.chmodSync(path, 0o555);
}

/** A random tree at `path`: usually a directory, sometimes a single file or symlink; one seed nests deeply. */
function makeTree(path: string, seed: number): void {
  const rnd = prng(seed);
  const p = Buffer.from(path);
  if (seed % 7 === 3) {
    makeFile(p, rnd);
    return;
  }
  if (seed % 7 === 5) {
    makeSymlink(p, rnd);
    return;
  }
  makeDir(p, rnd, 0, { n: 60 });
  if (seed % 4 === 0) {
    // Deep nesting: 60 levels, each with a file and an empty directory beside the next level.
    let d: Buffer = p;
    for (let i = 0; i < 60; i++) {
      d = join2(d, Buffer.from(`d${i % 3}`));
      if (fs.existsSync(d)) break;
      fs.mkdirSync(d);
      fs.writeFileSync(join2(d, Buffer.from('f')), `level ${i}\n`);
      fs.mkdirSync(join2(d, Buffer.from('empty')));
    }
  }
}

/** Walk a restored tree and check canonical store metadata; returns how many nodes were seen. */
function checkCanonical(path: Buffer): number {
  const st = fs.lstatSync(path);
  expect(st.mtimeMs, `mtime of ${path.toString()}`).toBe(1000);
  if (st.isSymbolicLink()) return 1;
  if (st.isFile()) {
    expect([0o444, 0o555]).toContain(st.mode & 0o7777);
    return 1;
  }
  expect(st.isDirectory()).toBe(true);
  expect(st.mode & 0o7777).toBe(0o555);
  let n = 1;
  for (const name of fs.readdirSync(path, { encoding: 'buffer' })) n += checkCanonical(join2(path, name));
  return n;
}

function removeTree(path: string): void {
  if (!fs.existsSync(path) && !isLink(path)) return;
  const chmodAll = (p: Buffer) => {
    const st = fs.lstatSync(p);
    if (st.isDirectory()) {
      fs.chmodSync(p, 0o755);
      for (const n of fs.readdirSync(p, { encoding: 'buffer' })) chmodAll(join2(p, n));
    }
  };
  chmodAll(Buffer.from(path));
  fs.rmSync(path, { recursive: true, force: true });
}

function isLink(p: string): boolean {
  try {
    return fs.lstatSync(p).isSymbolicLink();
  } catch {
    return false;
  }
}

let tmp: { path: string; cleanup: () => void };
beforeAll(() => {
  tmp = tempDir('buildbox-nar-');
});
afterAll(() => {
  removeTree(tmp.path);
});
let counter = 0;
const fresh = (label: string) => join(tmp.path, `${label}-${counter++}`);

// ---------------------------------------------------------------------------------------------------------------
// spec §4.2 vectors
// ---------------------------------------------------------------------------------------------------------------

const VECTORS: Array<{ name: string; make(p: string): void; size: number; sha256: string; hex?: string }> = [
  {
    name: 'regular file "hello\\n"',
    make: (p) => fs.writeFileSync(p, 'hello\n'),
    size: 120,
    sha256: '1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13',
    hex: [
      '0d00000000000000 6e69782d61726368 6976652d31000000',
      '0100000000000000 2800000000000000',
      '0400000000000000 7479706500000000',
      '0700000000000000 726567756c617200',
      '0800000000000000 636f6e74656e7473',
      '0600000000000000 68656c6c6f0a0000',
      '0100000000000000 2900000000000000',
    ]
      .join('')
      .replaceAll(' ', ''),
  },
  {
    name: 'empty regular file',
    make: (p) => fs.writeFileSync(p, ''),
    size: 112,
    sha256: '77ac62e2629d8e45f624589c0c8bf99e24b3a722349bf1e79bc186008534e246',
    hex:
      '0d000000000000006e69782d617263686976652d310000000100000000000000' +
      '2800000000000000040000000000000074797065000000000700000000000000' +
      '726567756c6172000800000000000000636f6e74656e74730000000000000000' +
      '01000000000000002900000000000000',
  },
  {
    name: 'empty directory',
    make: (p) => fs.mkdirSync(p),
    size: 96,
    sha256: 'a50a5ab6d992f5598edd92105059fae9acfc192981e08bd88534c2167e92526a',
    hex:
      '0d000000000000006e69782d617263686976652d310000000100000000000000' +
      '2800000000000000040000000000000074797065000000000900000000000000' +
      '6469726563746f72790000000000000001000000000000002900000000000000',
  },
  {
    name: 'directory { l -> "x", x = executable "a" }',
    make: (p) => {
      fs.mkdirSync(p);
      fs.symlinkSync('x', join(p, 'l'));
      fs.writeFileSync(join(p, 'x'), 'a', { mode: 0o755 });
    },
    size: 512,
    sha256: 'aeeb619ff1bd21f1557eef1cfba56081400115ac462788b2b728455e3c8f80bf',
  },
  {
    name: 'directory { a.sh, b.txt, sub/link }',
    make: (p) => {
      fs.mkdirSync(p);
      fs.writeFileSync(join(p, 'a.sh'), '#!/bin/sh\n', { mode: 0o755 });
      fs.writeFileSync(join(p, 'b.txt'), 'hi\n');
      fs.mkdirSync(join(p, 'sub'));
      fs.symlinkSync('b.txt', join(p, 'sub', 'link'));
    },
    size: 880,
    sha256: 'de109ae29eb44c8b3458944e44fd05c6560a6f17c461fc207acc42defad8955b',
  },
];

describe('spec §4.2 vectors', () => {
  for (const v of VECTORS) {
    it(`dumps ${v.name} like nix-store --dump`, async () => {
      const p = fresh('vec');
      v.make(p);
      const ours = await dumpPathToBuffer(p);
      expect(ours.length).toBe(v.size);
      expect(sha256(ours)).toBe(v.sha256);
      if (v.hex) expect(ours.toString('hex')).toBe(v.hex);
      expect(ours.equals(await nixDump(p))).toBe(true);
      const h = await narHashPath(p);
      expect(h.narHash.toString('hex')).toBe(v.sha256);
      expect(h.narSize).toBe(v.size);
      expect(await nixHash(p)).toBe(v.sha256);

      // And back: restore (one byte at a time) and dump again.
      const dest = fresh('vec-restored');
      const res = await restoreNar(readerOf(ours, [1]), dest, { expectEnd: true });
      expect(res.narHash.toString('hex')).toBe(v.sha256);
      expect(res.narSize).toBe(v.size);
      expect((await nixDump(dest)).equals(ours)).toBe(true);
      checkCanonical(Buffer.from(dest));
    });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// randomised trees
// ---------------------------------------------------------------------------------------------------------------

describe('randomised trees against nix 2.8', () => {
  const SEEDS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 17, 24, 33];
  for (const seed of SEEDS) {
    it(`seed ${seed}: dump, hash and restore agree with nix-store`, async () => {
      const src = fresh(`rand${seed}`);
      makeTree(src, seed);

      const nixNar = await nixDump(src);
      const chunks: Buffer[] = [];
      const tapped: Buffer[] = [];
      for await (const c of dumpPath(src, { onChunk: (b) => tapped.push(b), chunkSize: 256 * 1024 })) {
        chunks.push(c);
      }
      const ours = Buffer.concat(chunks);
      expect(ours.equals(nixNar), 'our NAR equals nix-store --dump byte for byte').toBe(true);
      expect(Buffer.concat(tapped).equals(ours)).toBe(true);
      for (const c of chunks) expect(c.length).toBeLessThanOrEqual(256 * 1024);

      const h = await narHashPath(src);
      expect(h.narHash.toString('hex')).toBe(await nixHash(src));
      expect(h.narSize).toBe(nixNar.length);

      // Restore with awkward chunking; the bytes seen by onChunk are the NAR.
      const dest = fresh(`rand${seed}-restored`);
      const seen: Buffer[] = [];
      const sizes = [1, 3, 8, 13, 4096, 7, 65536, 100_003];
      const res = await restoreNar(readerOf(nixNar, sizes), dest, { expectEnd: true, onChunk: (b) => seen.push(b) });
      expect(res.narSize).toBe(nixNar.length);
      expect(res.narHash.equals(h.narHash)).toBe(true);
      expect(Buffer.concat(seen).equals(nixNar)).toBe(true);
      expect((await nixDump(dest)).equals(nixNar), 'nix-store --dump of our restore equals the original').toBe(true);
      checkCanonical(Buffer.from(dest));

      // Nix restores our NAR to the same tree, and we dump Nix's restore identically.
      const viaNix = fresh(`rand${seed}-nix`);
      await nixRestore(ours, viaNix);
      expect((await dumpPathToBuffer(viaNix)).equals(ours)).toBe(true);

      // parseNar agrees without extracting anything.
      const parsed = await parseNar(readerOf(nixNar, [8, 1, 999]), { expectEnd: true });
      expect(parsed.narHash.equals(h.narHash)).toBe(true);
      expect(parsed.narSize).toBe(nixNar.length);
    });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// writer details
// ---------------------------------------------------------------------------------------------------------------

describe('dumpPath', () => {
  it('sorts names bytewise, not in JS string order', async () => {
    const p = fresh('order');
    fs.mkdirSync(p);
    // JS (UTF-16) order: '😀' (D83D…) < '｡' (FF61); UTF-8 bytewise: EF BD A1 < F0 9F 98 80.
    for (const n of ['😀', '\uff61', 'B', 'a', '_', '.x', '0']) fs.writeFileSync(join(p, n), n);
    const nar = await dumpPathToBuffer(p);
    expect(nar.equals(await nixDump(p))).toBe(true);
    expect(nar.indexOf(Buffer.from('\uff61'))).toBeLessThan(nar.indexOf(Buffer.from('😀')));
  });

  it('streams a large file in chunks of at most chunkSize and never yields it whole', async () => {
    const p = fresh('big');
    const data = Buffer.alloc(5 * 1024 * 1024 + 3, 0x5a);
    fs.writeFileSync(p, data);
    let max = 0;
    const h = new NarHasher();
    for await (const c of dumpPath(p, { chunkSize: 1024 * 1024, onChunk: (b) => h.update(b) })) {
      max = Math.max(max, c.length);
    }
    expect(max).toBeLessThanOrEqual(1024 * 1024);
    const { narHash, narSize } = h.digest();
    expect(narSize).toBe(data.length + 5 + 112);
    expect(narHash.toString('hex')).toBe(await nixHash(p));
  });

  it('honours any chunk size, down to one byte', async () => {
    const p = fresh('tiny-chunks');
    fs.mkdirSync(p);
    fs.writeFileSync(join(p, 'f'), 'hello');
    fs.symlinkSync('f', join(p, 'l'));
    const nar = await nixDump(p);
    for (const chunkSize of [1, 3, 8, 100]) {
      const chunks: Buffer[] = [];
      for await (const c of dumpPath(p, { chunkSize })) chunks.push(c);
      expect(Buffer.concat(chunks).equals(nar)).toBe(true);
      expect(Math.max(...chunks.map((c) => c.length))).toBe(chunkSize);
    }
    await expect(dumpPathToBuffer(p).then(() => dumpPath(p, { chunkSize: 0 }).next())).rejects.toThrow(RangeError);
  });

  it('uses only the owner execute bit', async () => {
    const p = fresh('xbits');
    fs.mkdirSync(p);
    for (const [n, m] of [
      ['g', 0o615],
      ['o', 0o601],
      ['u', 0o700],
      ['ro', 0o400],
    ] as const) {
      fs.writeFileSync(join(p, n), n);
      fs.chmodSync(join(p, n), m);
    }
    expect((await dumpPathToBuffer(p)).equals(await nixDump(p))).toBe(true);
  });

  it('dumps a top-level symlink itself, never what it points to', async () => {
    const target = fresh('target');
    fs.mkdirSync(target);
    fs.writeFileSync(join(target, 'secret'), 'x');
    const p = fresh('toplink');
    fs.symlinkSync(target, p);
    const nar = await dumpPathToBuffer(p);
    expect(nar.equals(await nixDump(p))).toBe(true);
    expect(nar.includes(Buffer.from('secret'))).toBe(false);
  });

  it('refuses sockets and FIFOs with an error naming the path', async () => {
    const d = fresh('special');
    fs.mkdirSync(d);
    fs.writeFileSync(join(d, 'a'), 'a');
    await run('mkfifo', [join(d, 'fifo')]);
    await expect(dumpPathToBuffer(d)).rejects.toThrow(
      new NarDumpError(
        `cannot put ${join(d, 'fifo')} in a NAR: it is a named pipe (only regular files, symlinks and directories can be)`,
      ),
    );
    await expect(narHashPath(join(d, 'fifo'))).rejects.toThrow(/fifo in a NAR: it is a named pipe/);

    const s = fresh('sockdir');
    fs.mkdirSync(s);
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(join(s, 'sock'), r));
    try {
      await expect(dumpPathToBuffer(s)).rejects.toThrow(`cannot put ${join(s, 'sock')} in a NAR: it is a socket`);
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
  });

  it('reports a missing path', async () => {
    await expect(dumpPathToBuffer(fresh('missing'))).rejects.toThrow(/ENOENT/);
  });

  it('can be stopped early without leaking file descriptors (return() closes the open file)', async () => {
    const p = fresh('early');
    fs.mkdirSync(p);
    for (let i = 0; i < 40; i++) fs.writeFileSync(join(p, `f${i}`), Buffer.alloc(300_000 + i));
    const before = fs.readdirSync('/proc/self/fd').length;
    const gen = dumpPath(p);
    await gen.next();
    await gen.next();
    await gen.return(undefined);
    await new Promise((r) => setTimeout(r, 50));
    expect(fs.readdirSync('/proc/self/fd').length).toBeLessThanOrEqual(before);
  });
});

describe('concurrency', () => {
  it('runs several dumps and restores at once through the shared I/O worker, each correct', async () => {
    const seeds = [101, 102, 103, 104];
    const srcs = seeds.map((seed) => {
      const p = fresh(`conc${seed}`);
      makeTree(p, seed);
      return p;
    });
    const nars = await Promise.all(srcs.map((p) => nixDump(p)));
    const dests = srcs.map((_, i) => fresh(`conc-out${i}`));
    const [dumps, restores, hashes] = await Promise.all([
      Promise.all(srcs.map((p) => dumpPathToBuffer(p))),
      Promise.all(nars.map((nar, i) => restoreNar(readerOf(nar, [7, 65536, 1000]), dests[i]!))),
      Promise.all(srcs.map((p) => narHashPath(p))),
    ]);
    for (let i = 0; i < srcs.length; i++) {
      expect(dumps[i]!.equals(nars[i]!)).toBe(true);
      expect(restores[i]!.narHash.toString('hex')).toBe(sha256(nars[i]!));
      expect(hashes[i]!.narHash.toString('hex')).toBe(sha256(nars[i]!));
      expect((await nixDump(dests[i]!)).equals(nars[i]!)).toBe(true);
    }
  });
});

// ---------------------------------------------------------------------------------------------------------------
// reader details
// ---------------------------------------------------------------------------------------------------------------

describe('restoreNar', () => {
  it('restores every kind of top-level node with canonical metadata', async () => {
    const kinds: Array<[string, (p: string) => void, number | null]> = [
      ['file', (p) => fs.writeFileSync(p, 'data'), 0o444],
      ['exec', (p) => fs.writeFileSync(p, '#!/bin/sh\n', { mode: 0o700 }), 0o555],
      ['link', (p) => fs.symlinkSync('/nonexistent/target', p), null],
      ['dir', (p) => fs.mkdirSync(p), 0o555],
    ];
    for (const [label, make, mode] of kinds) {
      const src = fresh(`top-${label}`);
      make(src);
      const nar = await nixDump(src);
      const dest = fresh(`top-${label}-out`);
      const res = await restoreNar(readerOf(nar), dest);
      expect(res.narHash.toString('hex')).toBe(sha256(nar));
      const st = fs.lstatSync(dest);
      if (mode !== null) expect(st.mode & 0o7777).toBe(mode);
      else expect(fs.readlinkSync(dest)).toBe('/nonexistent/target');
      expect(st.mtimeMs).toBe(1000);
      expect((await nixDump(dest)).equals(nar)).toBe(true);
    }
  });

  it('stops right after the closing token so the next message can be read', async () => {
    const src = fresh('next');
    fs.mkdirSync(src);
    fs.writeFileSync(join(src, 'f'), 'x'.repeat(1000));
    const nar = await nixDump(src);
    const stream = Buffer.concat([nar, encodeString('next message'), nar, encodeString('after')]);
    const r = readerOf(stream, [4096]);
    const dest = fresh('next-out');
    const a = await restoreNar(r, dest);
    expect(a.narSize).toBe(nar.length);
    expect(await r.readString()).toBe('next message');
    const b = await parseNar(r);
    expect(b.narHash.equals(a.narHash)).toBe(true);
    expect(await r.readString()).toBe('after');
    expect(await r.atEof()).toBe(true);
  });

  it('refuses an existing destination before reading', async () => {
    const dest = fresh('exists');
    fs.mkdirSync(dest);
    const r = readerOf(await nixDump(dest));
    await expect(restoreNar(r, dest)).rejects.toThrow(`cannot restore a NAR to ${dest}: it already exists`);
  });

  it('never writes through a symlink in the NAR', async () => {
    // A directory whose entry "a" is a symlink to a directory outside, followed by an entry that would only land
    // outside if names could contain "/" (they cannot: "a/evil" is refused). The outside directory stays empty.
    const outside = fresh('outside');
    fs.mkdirSync(outside);
    const src = fresh('linkdir');
    fs.mkdirSync(src);
    fs.symlinkSync(outside, join(src, 'a'));
    fs.writeFileSync(join(src, 'b'), 'b');
    const nar = await nixDump(src);
    const dest = fresh('linkdir-out');
    await restoreNar(readerOf(nar), dest);
    expect(fs.readlinkSync(join(dest, 'a'))).toBe(outside);
    expect(fs.readdirSync(outside)).toEqual([]);
    // The same NAR with entry "b" renamed to "a/b" (same length) is refused, and nothing is created anywhere.
    const evil = Buffer.from(nar);
    const at = evil.indexOf(Buffer.concat([encodeString('name'), encodeString('b')]));
    expect(at).toBeGreaterThan(0);
    const patched = Buffer.concat([
      evil.subarray(0, at),
      encodeString('name'),
      encodeString('a/b'),
      evil.subarray(at + 32),
    ]);
    const dest2 = fresh('linkdir-evil');
    await expect(restoreNar(readerOf(patched), dest2)).rejects.toThrow(/entry name "a\/b" contains "\/"/);
    expect(fs.existsSync(dest2)).toBe(false);
    expect(fs.readdirSync(outside)).toEqual([]);
  });

  it('writes big files without holding them: memory stays flat for a 64 MiB file', async () => {
    const size = 64 * 1024 * 1024;
    // A NAR for one big file, generated lazily so the test itself never holds it either.
    async function* source() {
      yield Buffer.concat([
        encodeString('nix-archive-1'),
        encodeString('('),
        encodeString('type'),
        encodeString('regular'),
        encodeString('contents'),
      ]);
      const len = Buffer.alloc(8);
      len.writeUInt32LE(size, 0);
      yield len;
      const chunk = Buffer.alloc(1024 * 1024, 0x61);
      for (let i = 0; i < size / chunk.length; i++) yield chunk;
      yield encodeString(')');
    }
    const dest = fresh('bigfile');
    const before = process.memoryUsage().arrayBuffers;
    let peak = 0;
    const timer = setInterval(() => {
      peak = Math.max(peak, process.memoryUsage().arrayBuffers - before);
    }, 5);
    const res = await restoreNar(new WireReader(source()), dest, { expectEnd: true });
    clearInterval(timer);
    expect(res.narSize).toBe(size + 112);
    expect(fs.statSync(dest).size).toBe(size);
    expect(peak).toBeLessThan(48 * 1024 * 1024);
    expect((await narHashPath(dest)).narHash.equals(res.narHash)).toBe(true);
  });

  it('keeps the stream in sync after an I/O error when asked to (drainOnIoError)', async () => {
    const src = fresh('drain');
    fs.mkdirSync(src);
    fs.writeFileSync(join(src, 'f'), 'x');
    const nar = await nixDump(src);
    const r = readerOf(Buffer.concat([nar, encodeString('next')]));
    // The destination's parent does not exist: creating the temp dir fails with ENOENT.
    const dest = join(fresh('noparent'), 'x');
    await expect(restoreNar(r, dest, { drainOnIoError: true })).rejects.toThrow(
      `cannot extract the NAR to ${dest}: ENOENT: no such file or directory, mkdir '${dest}'`,
    );
    expect(await r.readString()).toBe('next');
  });

  it('stops on abort and leaves nothing behind', async () => {
    const parent = fresh('abort');
    fs.mkdirSync(parent);
    const src = fresh('abort-src');
    fs.mkdirSync(src);
    for (let i = 0; i < 5; i++) fs.writeFileSync(join(src, `f${i}`), 'x'.repeat(100));
    const nar = await nixDump(src);
    const ac = new AbortController();
    let n = 0;
    async function* slow() {
      for (let i = 0; i < nar.length; i += 64) {
        if (++n === 10) ac.abort(new Error('client went away'));
        yield nar.subarray(i, i + 64);
      }
    }
    await expect(restoreNar(new WireReader(slow()), join(parent, 'out'), { signal: ac.signal })).rejects.toThrow(
      'client went away',
    );
    expect(fs.readdirSync(parent)).toEqual([]);
  });
});

// ---------------------------------------------------------------------------------------------------------------
// without root: permissions are real
// ---------------------------------------------------------------------------------------------------------------

describe('as an unprivileged user', () => {
  /** A script run as nobody (setpriv) against the module transpiled to plain JS, since root ignores permissions. */
  const SCRIPT = `
import * as fs from 'node:fs';
import { join } from 'node:path';
import { restoreNar, dumpPathToBuffer } from './nar.js';
import { WireReader } from './wire.js';
const [narFile, parent] = process.argv.slice(2);
const nar = fs.readFileSync(narFile);
const once = async function* (b) { yield b; };
const out = {};
// 1. A normal restore: read-only files and directories, then dumped back.
const ok = join(parent, 'ok');
await restoreNar(new WireReader(once(nar)), ok, { expectEnd: true });
out.roundTrip = (await dumpPathToBuffer(ok)).equals(nar);
out.topMode = (fs.statSync(ok).mode & 0o7777).toString(8);
// 2. The destination appears after the tree is complete and read-only: the tree must still be removed.
const dest = join(parent, 'late');
async function* src() {
  yield nar.subarray(0, 64);
  fs.mkdirSync(dest);
  yield nar.subarray(64);
}
try {
  await restoreNar(new WireReader(src()), dest);
  out.late = 'no error';
} catch (e) {
  out.late = e.message;
}
// 3. A parse error part-way, after directories and files exist.
const cut = join(parent, 'cut');
try {
  await restoreNar(new WireReader(once(nar.subarray(0, nar.length - 8))), cut);
} catch (e) {
  out.cut = e.message;
}
out.entries = fs.readdirSync(parent).sort();
console.log(JSON.stringify(out));
`;

  it('restores with canonical modes and removes a failed, read-only tree', async () => {
    const dir = fresh('unpriv');
    fs.mkdirSync(dir);
    for (const f of ['nar', 'wire']) {
      const src = fs.readFileSync(join(REPO, 'src', `${f}.ts`), 'utf8');
      const js = ts.transpileModule(src, {
        compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
      }).outputText;
      fs.writeFileSync(join(dir, `${f}.js`), js);
    }
    fs.writeFileSync(join(dir, 'package.json'), '{"type":"module"}');
    fs.writeFileSync(join(dir, 'script.js'), SCRIPT);
    const srcTree = fresh('unpriv-src');
    makeTree(srcTree, 8);
    fs.writeFileSync(join(dir, 'tree.nar'), await nixDump(srcTree));
    const parent = join(dir, 'parent');
    fs.mkdirSync(parent);
    fs.chownSync(parent, 65534, 65534);
    fs.chmodSync(tmp.path, 0o755);
    const r = await run(
      'setpriv',
      [
        '--reuid=65534',
        '--regid=65534',
        '--clear-groups',
        process.execPath,
        join(dir, 'script.js'),
        join(dir, 'tree.nar'),
        parent,
      ],
      { cwd: dir },
    );
    const out = JSON.parse(r.stdout);
    expect(out.roundTrip).toBe(true);
    expect(out.topMode).toBe('555');
    expect(out.late).toBe(`cannot restore a NAR to ${join(parent, 'late')}: it appeared while the NAR was being read`);
    expect(out.cut).toMatch(/^NAR truncated after \d+ bytes/);
    // Only the successful restore and the directory that appeared: no temporary tree left.
    expect(out.entries).toEqual(['late', 'ok']);
    expect(fs.readdirSync(join(parent, 'late'))).toEqual([]);
  });
});
