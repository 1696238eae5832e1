/**
 * How `restoreNar` builds a tree: the first nodes of a small tree in-thread, the rest through the shared I/O worker,
 * with the same results and the same cleanup either way; and `direct` extraction into a fresh scratch name (no
 * temporary name, no rename), which still never replaces or removes anything it did not make.
 */
import * as fs from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dumpPathToBuffer, restoreNar } from '../src/nar.js';
import { encodeString, WireReader } from '../src/wire.js';
import { runBuffer, tempDir } from './helpers/exec.js';
import { nixEnv } from './helpers/nix.js';

let tmp: { path: string; cleanup: () => void };
let seq = 0;
beforeAll(() => {
  tmp = tempDir('buildbox-nar-extract-');
});
afterAll(() => tmp.cleanup());

const fresh = (label: string) => join(tmp.path, `${label}-${++seq}`);

function readerOf(data: Buffer, chunk = data.length || 1): WireReader {
  async function* gen() {
    for (let off = 0; off < data.length; off += chunk) yield data.subarray(off, off + chunk);
  }
  return new WireReader(gen());
}

const nixDump = (path: string) => runBuffer('nix-store', ['--dump', path], nixEnv());

/** Every entry below `dir` (relative paths), sorted. */
function listTree(dir: string): string[] {
  return (fs.readdirSync(dir, { recursive: true }) as string[]).sort();
}

/** A directory of `files` small files, `dirs` subdirectories with a file each, a symlink and one `big`-byte file. */
function makeTree(path: string, files: number, dirs: number, big: number): void {
  fs.mkdirSync(path);
  for (let i = 0; i < files; i++) fs.writeFileSync(join(path, `f${String(i).padStart(3, '0')}`), `file ${i}\n`);
  for (let i = 0; i < dirs; i++) {
    fs.mkdirSync(join(path, `d${i}`));
    fs.writeFileSync(join(path, `d${i}`, 'x'), 'x', { mode: 0o755 });
  }
  fs.symlinkSync('f000', join(path, 'link'));
  if (big > 0) fs.writeFileSync(join(path, 'zbig'), Buffer.alloc(big, 0x62));
}

describe('restoreNar: in-thread and worker extraction', () => {
  const shapes: Array<[string, number, number, number]> = [
    ['one small file tree', 1, 0, 0],
    ['more nodes than are made in-thread', 40, 5, 0],
    ['more bytes than are written in-thread', 3, 1, 300 * 1024],
    ['a big file only', 0, 0, 2 * 1024 * 1024],
  ];
  for (const [label, files, dirs, big] of shapes) {
    it(`restores ${label} exactly, with canonical metadata`, async () => {
      const src = fresh('src');
      makeTree(src, files, dirs, big);
      const nar = await nixDump(src);
      for (const chunk of [nar.length, 4096, 333]) {
        const dest = fresh('out');
        const res = await restoreNar(readerOf(nar, chunk), dest, { expectEnd: true });
        expect(res.narSize).toBe(nar.length);
        expect((await dumpPathToBuffer(dest)).equals(nar)).toBe(true);
        expect(listTree(dest)).toEqual(listTree(src));
        for (const e of listTree(dest)) {
          const st = fs.lstatSync(join(dest, e));
          if (!st.isSymbolicLink()) {
            expect(st.mtimeMs).toBe(1000);
            expect(st.mode & 0o222).toBe(0);
          }
        }
        expect(fs.readdirSync(tmp.path).filter((n) => n.includes('.tmp-'))).toEqual([]);
      }
    });
  }

  it('leaves nothing behind when the NAR breaks off after the switch to the worker', async () => {
    const src = fresh('src');
    makeTree(src, 40, 3, 0);
    const nar = await nixDump(src);
    const parent = fresh('parent');
    fs.mkdirSync(parent);
    for (const cut of [200, Math.floor(nar.length / 2), nar.length - 8]) {
      await expect(restoreNar(readerOf(nar.subarray(0, cut), 512), join(parent, 'out'))).rejects.toThrow(
        /NAR truncated/,
      );
      expect(fs.readdirSync(parent)).toEqual([]);
    }
  });

  it('reports an I/O error in-thread like the worker does, and keeps the stream in sync when asked to', async () => {
    const src = fresh('src');
    makeTree(src, 2, 0, 0);
    const nar = await nixDump(src);
    const dest = join(fresh('noparent'), 'x');
    const r = readerOf(Buffer.concat([nar, encodeString('next')]));
    await expect(restoreNar(r, dest, { drainOnIoError: true })).rejects.toThrow(
      `cannot extract the NAR to ${dest}: ENOENT: no such file or directory, mkdir '${dest}'`,
    );
    expect(await r.readString()).toBe('next');
  });
});

describe('restoreNar: direct', () => {
  it('builds the tree at the destination itself, with no temporary name beside it', async () => {
    const src = fresh('src');
    makeTree(src, 30, 2, 300 * 1024);
    const nar = await nixDump(src);
    const parent = fresh('parent');
    fs.mkdirSync(parent);
    const dest = join(parent, 'out');
    const res = await restoreNar(readerOf(nar, 1000), dest, { direct: true, expectEnd: true });
    expect(res.narSize).toBe(nar.length);
    expect(fs.readdirSync(parent)).toEqual(['out']);
    expect((await dumpPathToBuffer(dest)).equals(nar)).toBe(true);
  });

  it('never replaces an existing destination, and leaves it as it was', async () => {
    for (const [label, big] of [
      ['small file', 0],
      ['big file', 1024 * 1024],
    ] as const) {
      const src = fresh('src');
      fs.writeFileSync(src, Buffer.alloc(big || 10, 0x61));
      const nar = await nixDump(src);
      for (const existing of ['file', 'dir']) {
        const dest = fresh(`exists-${label}`);
        if (existing === 'file') fs.writeFileSync(dest, 'keep me');
        else {
          fs.mkdirSync(dest);
          fs.writeFileSync(join(dest, 'inside'), 'keep me');
        }
        await expect(restoreNar(readerOf(nar, 4096), dest, { direct: true })).rejects.toThrow(
          `cannot extract the NAR to ${dest}: EEXIST`,
        );
        if (existing === 'file') expect(fs.readFileSync(dest, 'utf8')).toBe('keep me');
        else expect(fs.readFileSync(join(dest, 'inside'), 'utf8')).toBe('keep me');
      }
    }
  });

  it('removes what it made when the NAR is bad', async () => {
    const src = fresh('src');
    makeTree(src, 30, 2, 0);
    const nar = await nixDump(src);
    const parent = fresh('parent');
    fs.mkdirSync(parent);
    await expect(
      restoreNar(readerOf(nar.subarray(0, nar.length - 8), 700), join(parent, 'out'), { direct: true }),
    ).rejects.toThrow(/NAR truncated/);
    expect(fs.readdirSync(parent)).toEqual([]);
  });
});
