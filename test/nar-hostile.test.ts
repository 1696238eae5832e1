/**
 * Hostile NARs: every malformed or over-limit input is refused with its specific error (message and NAR byte offset),
 * by both `restoreNar` and `parseNar`, and `restoreNar` leaves nothing behind in the destination's parent directory.
 */
import * as fs from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NarError, NarRestoreError, parseNar, type RestoreOptions, restoreNar } from '../src/nar.js';
import { encodeString, WireReader } from '../src/wire.js';
import { runBuffer, tempDir } from './helpers/exec.js';
import { nixEnv } from './helpers/nix.js';

type Tok = string | Buffer;
const enc = (t: Tok) => encodeString(t);
const cat = (toks: Tok[]) => Buffer.concat(toks.map(enc));

const MAGIC: Tok[] = ['nix-archive-1'];
const file = (contents: Tok, exec = false): Tok[] => [
  '(',
  'type',
  'regular',
  ...(exec ? ['executable', ''] : []),
  'contents',
  contents,
  ')',
];
const link = (target: Tok): Tok[] => ['(', 'type', 'symlink', 'target', target, ')'];
const entry = (name: Tok, node: Tok[]): Tok[] => ['entry', '(', 'name', name, 'node', ...node, ')'];
const dir = (...entries: Tok[][]): Tok[] => ['(', 'type', 'directory', ...entries.flat(), ')'];

function readerOf(data: Buffer, chunk = data.length || 1): WireReader {
  async function* gen() {
    for (let off = 0; off < data.length; off += chunk) yield data.subarray(off, off + chunk);
  }
  return new WireReader(gen());
}

let tmp: { path: string; cleanup: () => void };
beforeAll(() => {
  tmp = tempDir('buildbox-nar-hostile-');
});
afterAll(() => tmp.cleanup());
let counter = 0;
function freshParent(): string {
  const p = join(tmp.path, `p${counter++}`);
  fs.mkdirSync(p);
  return p;
}

/**
 * Restore and parse `bytes`; both must fail with a NarError whose message contains `msg` at NAR offset `offset`, and
 * the destination's parent must be empty afterwards. Delivered whole and in 8-byte and 3-byte chunks.
 */
async function expectRefused(bytes: Buffer, msg: string | RegExp, offset: number, opts: RestoreOptions = {}) {
  for (const chunk of [bytes.length || 1, 8, 3]) {
    const parent = freshParent();
    const err = await restoreNar(readerOf(bytes, chunk), join(parent, 'out'), opts).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err, `restoreNar must refuse (chunk ${chunk})`).toBeInstanceOf(NarError);
    const e = err as NarError;
    if (typeof msg === 'string') expect(e.message).toContain(msg);
    else expect(e.message).toMatch(msg);
    expect(e.offset, e.message).toBe(offset);
    expect(e.message).toContain(`(at byte ${offset})`);
    expect(fs.readdirSync(parent), 'nothing left behind').toEqual([]);

    const perr = await parseNar(readerOf(bytes, chunk), opts).then(
      () => null,
      (x: unknown) => x,
    );
    expect(perr).toBeInstanceOf(NarError);
    expect((perr as NarError).message).toBe(e.message);
  }
}

/** Offset at which `toks` end, i.e. where the next token starts. */
const at = (...toks: Tok[][]) => cat(toks.flat()).length;

// A few files before the bad spot, so that a refusal happens with part of the tree already on disk.
const before: Tok[][] = [
  entry('a', file('aaaa')),
  entry('b', dir(entry('c', file('x'.repeat(5000), true)), entry('d', link('../a')))),
];

describe('hostile names', () => {
  const bad: Array<[string, Tok, string]> = [
    ['..', '..', 'invalid entry name ".."'],
    ['.', '.', 'invalid entry name "."'],
    ['a/b', 'c/d', 'entry name "c/d" contains "/"'],
    ['/', '/', 'entry name "/" contains "/"'],
    ['../../etc/passwd', '../../etc/passwd', 'entry name "../../etc/passwd" contains "/"'],
    ['NUL', Buffer.from('c\0d'), 'entry name "c\\x00d" contains a NUL byte'],
    ['empty', '', 'empty entry name'],
  ];
  for (const [label, name, msg] of bad) {
    it(`refuses the name ${label}`, async () => {
      const bytes = cat([...MAGIC, ...dir(...before, entry(name, file('evil')))]);
      const off = at(MAGIC, ['(', 'type', 'directory'], ...before, ['entry', '(', 'name']);
      await expectRefused(bytes, msg, off);
    });
  }

  it('refuses unsorted names', async () => {
    const bytes = cat([...MAGIC, ...dir(entry('b', file('')), entry('a', file('')))]);
    await expectRefused(
      bytes,
      'entry names are not sorted: "a" comes after "b"',
      at(MAGIC, ['(', 'type', 'directory'], entry('b', file('')), ['entry', '(', 'name']),
    );
  });

  it('compares names bytewise: refuses JS order when it differs, accepts byte order', async () => {
    // UTF-16 order puts U+1F600 before U+FF61; UTF-8 byte order puts U+FF61 (EF BD A1) first.
    const jsOrder = cat([...MAGIC, ...dir(entry('😀', file('')), entry('\uff61', file('')))]);
    await expectRefused(
      jsOrder,
      'entry names are not sorted: "\\xef\\xbd\\xa1" comes after "\\xf0\\x9f\\x98\\x80"',
      at(MAGIC, ['(', 'type', 'directory'], entry('😀', file('')), ['entry', '(', 'name']),
    );
    const byteOrder = cat([...MAGIC, ...dir(entry('\uff61', file('')), entry('😀', file('')))]);
    const parent = freshParent();
    await restoreNar(readerOf(byteOrder), join(parent, 'ok'));
    expect(fs.readdirSync(join(parent, 'ok')).sort()).toEqual(['😀', '\uff61'].sort());
    // And uppercase sorts before lowercase.
    await expectRefused(
      cat([...MAGIC, ...dir(entry('b', file('')), entry('B', file('')))]),
      'not sorted: "B" comes after "b"',
      at(MAGIC, ['(', 'type', 'directory'], entry('b', file('')), ['entry', '(', 'name']),
    );
  });

  it('refuses duplicate names', async () => {
    const bytes = cat([...MAGIC, ...dir(entry('a', file('1')), entry('a', file('2')))]);
    await expectRefused(
      bytes,
      'duplicate entry name "a"',
      at(MAGIC, ['(', 'type', 'directory'], entry('a', file('1')), ['entry', '(', 'name']),
    );
  });

  it('refuses a symlink followed by a file of the same name (never writes through the link)', async () => {
    const outside = freshParent();
    const bytes = cat([...MAGIC, ...dir(entry('a', link(outside)), entry('a', file('pwned')))]);
    await expectRefused(
      bytes,
      'duplicate entry name "a"',
      at(MAGIC, ['(', 'type', 'directory'], entry('a', link(outside)), ['entry', '(', 'name']),
    );
    expect(fs.readdirSync(outside)).toEqual([]);
  });

  it('refuses a symlink followed by a directory of the same name with a file inside', async () => {
    const outside = freshParent();
    const bytes = cat([...MAGIC, ...dir(entry('a', link(outside)), entry('a', dir(entry('f', file('pwned')))))]);
    await expectRefused(
      bytes,
      'duplicate entry name "a"',
      at(MAGIC, ['(', 'type', 'directory'], entry('a', link(outside)), ['entry', '(', 'name']),
    );
    expect(fs.readdirSync(outside)).toEqual([]);
  });
});

describe('hostile lengths', () => {
  const u64 = (v: bigint) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(v);
    return b;
  };
  const fileHead = cat([...MAGIC, '(', 'type', 'regular', 'contents']);

  it('refuses a file bigger than maxSize before reading its contents', async () => {
    // The contents are not even there: the limit is checked on the declared length.
    const bytes = Buffer.concat([fileHead, u64(2n * 1024n * 1024n)]);
    await expectRefused(
      bytes,
      'file of 2097152 bytes does not fit in the NAR size limit of 1048576 bytes',
      fileHead.length,
      { maxSize: 1024 * 1024 },
    );
  });

  it('refuses a file bigger than maxFileSize', async () => {
    const bytes = Buffer.concat([fileHead, u64(1001n)]);
    await expectRefused(bytes, 'file is too large (1001 bytes, at most 1000 allowed)', fileHead.length, {
      maxFileSize: 1000,
    });
  });

  it('refuses lengths of 2^53 and more', async () => {
    const bytes = Buffer.concat([fileHead, u64(0xffff_ffff_ffff_ffffn)]);
    await expectRefused(bytes, 'length of file contents is too large (18446744073709551615)', fileHead.length);
    const huge = Buffer.concat([fileHead, u64(2n ** 53n)]);
    await expectRefused(huge, 'length of file contents is too large (9007199254740992)', fileHead.length);
  });

  it('refuses a huge declared file length by default (no maxSize) with a truncation, not an allocation', async () => {
    const bytes = Buffer.concat([fileHead, u64(2n ** 50n), Buffer.alloc(64)]);
    await expectRefused(
      bytes,
      /NAR truncated after 160 bytes: .*file contents \(1125899906842560 of 1125899906842624/,
      160,
    );
  });

  it('refuses names longer than maxNameLength (default 255) before reading them', async () => {
    const pre = cat([...MAGIC, '(', 'type', 'directory', 'entry', '(', 'name']);
    await expectRefused(
      cat([...MAGIC, ...dir(entry('n'.repeat(256), file('')))]),
      'entry name is too long (256 bytes, at most 255 allowed)',
      pre.length,
    );
    await expectRefused(
      Buffer.concat([pre, u64(1n << 40n)]),
      'entry name is too long (1099511627776 bytes, at most 255 allowed)',
      pre.length,
    );
    await expectRefused(
      cat([...MAGIC, ...dir(entry('abcdefghijk', file('')))]),
      'entry name is too long (11 bytes, at most 10 allowed)',
      pre.length,
      { maxNameLength: 10 },
    );
  });

  it('refuses symlink targets that are too long, empty or contain NUL', async () => {
    const pre = cat([...MAGIC, '(', 'type', 'symlink', 'target']);
    await expectRefused(
      cat([...MAGIC, ...link('t'.repeat(4096))]),
      'symlink target is too long (4096 bytes, at most 4095 allowed)',
      pre.length,
    );
    await expectRefused(cat([...MAGIC, ...link('')]), 'symlink target is empty', pre.length);
    await expectRefused(
      cat([...MAGIC, ...link(Buffer.from('a\0b'))]),
      'symlink target "a\\x00b" contains a NUL byte',
      pre.length,
    );
  });

  it('refuses a NAR bigger than maxSize', async () => {
    const entries = Array.from({ length: 20 }, (_, i) => entry(`f${String(i).padStart(2, '0')}`, file('')));
    const bytes = cat([...MAGIC, ...dir(...entries)]);
    const parent = freshParent();
    const err = (await restoreNar(readerOf(bytes), join(parent, 'out'), { maxSize: 1000 }).catch((e) => e)) as Error;
    expect(err).toBeInstanceOf(NarError);
    expect(err.message).toMatch(/^NAR exceeds the size limit of 1000 bytes while reading /);
    expect((err as NarError).offset).toBeLessThanOrEqual(1000);
    expect(fs.readdirSync(parent)).toEqual([]);
    // Exactly at the limit is fine.
    await parseNar(readerOf(bytes), { maxSize: bytes.length, expectEnd: true });
    await expect(parseNar(readerOf(bytes), { maxSize: bytes.length - 8 })).rejects.toThrow(/size limit/);
  });

  it('refuses nesting deeper than maxDepth', async () => {
    let node: Tok[] = file('deep');
    for (let i = 0; i < 4; i++) node = dir(entry('d', node));
    const bytes = cat([...MAGIC, ...node]);
    await parseNar(readerOf(bytes), { maxDepth: 4 });
    // Depth 4 entry inside the 4th directory: refused at its "entry" token.
    const entryAt = at(
      MAGIC,
      ...Array.from({ length: 4 }, () => ['(', 'type', 'directory']),
      ...Array.from({ length: 3 }, () => ['entry', '(', 'name', 'd', 'node']),
    );
    await expectRefused(bytes, 'directories are nested too deeply (more than 3 levels)', entryAt, { maxDepth: 3 });
  });
});

describe('hostile tokens and padding', () => {
  it('refuses a wrong magic', async () => {
    await expectRefused(
      cat(['nix-archive-2', ...file('')]),
      'not a NAR: expected "nix-archive-1", got "nix-archive-2"',
      0,
    );
    await expectRefused(cat(['x'.repeat(100)]), 'not a NAR: expected "nix-archive-1", got a 100-byte string', 0);
  });

  const cases: Array<[string, Tok[], string, number]> = [
    ['"[" for "("', [...MAGIC, '['], 'expected "(", got "["', at(MAGIC)],
    ['"kind" for "type"', [...MAGIC, '(', 'kind'], 'expected "type", got "kind"', at(MAGIC, ['('])],
    [
      'an unknown type',
      [...MAGIC, '(', 'type', 'fifo', ')'],
      'expected "regular", "symlink" or "directory", got "fifo"',
      at(MAGIC, ['(', 'type']),
    ],
    [
      'a regular file without contents',
      [...MAGIC, '(', 'type', 'regular', ')'],
      'expected "executable" or "contents", got ")"',
      at(MAGIC, ['(', 'type', 'regular']),
    ],
    [
      'a non-empty executable marker',
      [...MAGIC, '(', 'type', 'regular', 'executable', 'yes', 'contents', '', ')'],
      'expected "" after "executable", got a 3-byte string',
      at(MAGIC, ['(', 'type', 'regular', 'executable']),
    ],
    [
      '"executable" after "contents"',
      [...MAGIC, '(', 'type', 'regular', 'contents', 'x', 'executable', '', ')'],
      'expected ")", got "executable"',
      at(MAGIC, ['(', 'type', 'regular', 'contents', 'x']),
    ],
    [
      'two "executable" markers',
      [...MAGIC, '(', 'type', 'regular', 'executable', '', 'executable', '', 'contents', '', ')'],
      'expected "contents", got "executable"',
      at(MAGIC, ['(', 'type', 'regular', 'executable', '']),
    ],
    [
      'a second "contents"',
      [...MAGIC, '(', 'type', 'regular', 'contents', 'x', 'contents', 'y', ')'],
      'expected ")", got "contents"',
      at(MAGIC, ['(', 'type', 'regular', 'contents', 'x']),
    ],
    [
      '"entries" for "entry"',
      [...MAGIC, '(', 'type', 'directory', 'entries', ')'],
      'expected "entry" or ")", got "entries"',
      at(MAGIC, ['(', 'type', 'directory']),
    ],
    [
      'a missing "node"',
      [...MAGIC, '(', 'type', 'directory', 'entry', '(', 'name', 'a', '(', 'type', 'regular'],
      'expected "node", got "("',
      at(MAGIC, ['(', 'type', 'directory', 'entry', '(', 'name', 'a']),
    ],
    [
      'a missing entry ")"',
      [...MAGIC, ...dir(['entry', '(', 'name', 'a', 'node', ...file('x'), 'entry'])],
      'expected ")", got "entry"',
      at(MAGIC, ['(', 'type', 'directory', 'entry', '(', 'name', 'a', 'node', ...file('x')]),
    ],
    [
      'a symlink with "contents"',
      [...MAGIC, '(', 'type', 'symlink', 'contents', 'x', ')'],
      'expected "target", got "contents"',
      at(MAGIC, ['(', 'type', 'symlink']),
    ],
    ['a long token where "(" belongs', [...MAGIC, 'y'.repeat(40)], 'expected "(", got a 40-byte string', at(MAGIC)],
    [
      'a second "type" in a node',
      [...MAGIC, '(', 'type', 'directory', 'type', 'regular', ')'],
      'expected "entry" or ")", got "type"',
      at(MAGIC, ['(', 'type', 'directory']),
    ],
  ];
  for (const [label, toks, msg, off] of cases) {
    it(`refuses ${label}`, async () => {
      await expectRefused(cat(toks), msg, off);
    });
  }

  it('refuses non-zero padding anywhere', async () => {
    const good = cat([...MAGIC, ...dir(entry('abc', file('hello', true)), entry('l', link('tgt')))]);
    await parseNar(readerOf(good), { expectEnd: true });
    // Every padding byte in the NAR: flip it and expect "non-zero padding" at the start of that padding.
    const paddings: Array<[number, number, string]> = [];
    for (let off = 0; off < good.length; ) {
      const len = Number(good.readBigUInt64LE(off));
      const pad = (8 - (len % 8)) % 8;
      if (pad > 0) paddings.push([off + 8 + len, pad, good.subarray(off + 8, off + 8 + len).toString()]);
      off += 8 + len + pad;
    }
    expect(paddings.length).toBeGreaterThan(10);
    for (const [start, pad, tok] of paddings) {
      for (const k of [0, pad - 1]) {
        const bad = Buffer.from(good);
        bad[start + k] = 0x01;
        const what =
          tok === 'hello'
            ? 'file contents'
            : tok === 'abc' || tok === 'l'
              ? 'entry name'
              : tok === 'tgt'
                ? 'symlink target'
                : 'token';
        await expectRefused(bad, new RegExp(`^non-zero padding after (NAR magic|${what})`), start);
      }
    }
  });

  it('refuses anything after the NAR with expectEnd, and accepts it without', async () => {
    const good = cat([...MAGIC, ...dir(entry('a', file('1')))]);
    const bytes = Buffer.concat([good, Buffer.from('garbage!')]);
    await expectRefused(bytes, 'unexpected data after the end of the NAR', good.length, { expectEnd: true });
    const parent = freshParent();
    await restoreNar(readerOf(bytes), join(parent, 'ok'));
    expect(fs.readFileSync(join(parent, 'ok', 'a'), 'utf8')).toBe('1');
  });
});

describe('truncated streams', () => {
  it('refuses a NAR cut at every offset, naming where it ended, and leaves nothing behind', async () => {
    const good = cat([
      ...MAGIC,
      ...dir(
        entry('a', file('x'.repeat(37), true)),
        entry('d', dir(entry('e', dir()), entry('f', file('')), entry('l', link('../a')))),
        entry('z', file('tail')),
      ),
    ]);
    const parent = freshParent();
    for (let k = 0; k < good.length; k++) {
      const cut = good.subarray(0, k);
      const err = (await restoreNar(readerOf(cut, 16), join(parent, 'out')).catch((e) => e)) as NarError;
      expect(err).toBeInstanceOf(NarError);
      expect(err.message).toMatch(
        new RegExp(`^NAR truncated after ${k} bytes: unexpected end of stream while reading `),
      );
      expect(err.offset).toBeLessThanOrEqual(k);
      expect(fs.readdirSync(parent)).toEqual([]);
    }
    await restoreNar(readerOf(good, 16), join(parent, 'out'), { expectEnd: true });
  });

  it('refuses a NAR of a real tree cut inside a large file', async () => {
    const src = join(tmp.path, 'src-big');
    fs.mkdirSync(src);
    fs.writeFileSync(join(src, 'big'), Buffer.alloc(3_000_000, 7));
    fs.writeFileSync(join(src, 'small'), 'small');
    const nar = await runBuffer('nix-store', ['--dump', src], nixEnv());
    for (const k of [200, 1_000_000, 2_999_999, nar.length - 1]) {
      const parent = freshParent();
      await expect(restoreNar(readerOf(nar.subarray(0, k), 65536), join(parent, 'out'))).rejects.toThrow(
        new RegExp(`^NAR truncated after ${k} bytes`),
      );
      expect(fs.readdirSync(parent)).toEqual([]);
    }
  });
});

describe('failures after extraction started', () => {
  it('cleans up after an I/O error part-way (name the file system refuses)', async () => {
    const parent = freshParent();
    const bytes = cat([...MAGIC, ...dir(...before, entry('n'.repeat(300), file('x')))]);
    const dest = join(parent, 'out');
    const err = await restoreNar(readerOf(bytes), dest, { maxNameLength: 1000 }).catch((e) => e);
    expect(err).toBeInstanceOf(NarRestoreError);
    expect((err as NarRestoreError).code).toBe('ENAMETOOLONG');
    expect((err as Error).message).toBe(
      `cannot extract the NAR to ${dest}: ENAMETOOLONG: name too long, open '${dest}/${'n'.repeat(300)}'`,
    );
    expect(fs.readdirSync(parent)).toEqual([]);
  });

  it('cleans up the finished, read-only tree when the destination appears meanwhile', async () => {
    const parent = freshParent();
    const dest = join(parent, 'out');
    const bytes = cat([...MAGIC, ...dir(...before)]);
    async function* src() {
      yield bytes.subarray(0, 100);
      fs.mkdirSync(dest);
      fs.writeFileSync(join(dest, 'theirs'), 'keep');
      yield bytes.subarray(100);
    }
    await expect(restoreNar(new WireReader(src()), dest)).rejects.toThrow(
      `cannot restore a NAR to ${dest}: it appeared while the NAR was being read`,
    );
    expect(fs.readdirSync(parent)).toEqual(['out']);
    expect(fs.readdirSync(dest)).toEqual(['theirs']);
  });

  it('propagates an error of the source itself and cleans up', async () => {
    const parent = freshParent();
    const bytes = cat([...MAGIC, ...dir(...before)]);
    async function* src() {
      yield bytes.subarray(0, 300);
      throw new Error('connection reset');
    }
    await expect(restoreNar(new WireReader(src()), join(parent, 'out'))).rejects.toThrow('connection reset');
    expect(fs.readdirSync(parent)).toEqual([]);
  });
});
