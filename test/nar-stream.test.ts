/**
 * Streaming a NAR out through reused memory: `dumpPath` with `recycle` lends its chunks (the same few buffers come
 * back filled with later bytes), and `WireWriter.writeBorrowed` gives a chunk back only once the sink is done with it,
 * or has gone away.
 */
import * as fs from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dumpPath, dumpPathToBuffer } from '../src/nar.js';
import { WireWriter } from '../src/wire.js';
import { tempDir } from './helpers/exec.js';

let tmp: { path: string; cleanup: () => void };
beforeAll(() => {
  tmp = tempDir('buildbox-nar-stream-');
});
afterAll(() => tmp.cleanup());

/** A tree with a few MiB of file contents. */
function makeTree(): string {
  const dir = join(tmp.path, `tree-${Math.random().toString(36).slice(2)}`);
  fs.mkdirSync(dir);
  for (let i = 0; i < 10; i++) {
    const b = Buffer.alloc(1000 * 1024 + i * 1000);
    for (let j = 0; j < b.length; j += 4) b.writeUInt32LE((i * 7919 + j) >>> 0, j);
    fs.writeFileSync(join(dir, `f${i}`), b);
  }
  fs.writeFileSync(join(dir, 'small'), 'x');
  return dir;
}

describe('dumpPath with recycle', () => {
  it('yields the exact NAR through a few reused buffers', async () => {
    const dir = makeTree();
    const whole = await dumpPathToBuffer(dir);
    expect(whole.length).toBeGreaterThan(9 * 1024 * 1024);
    for (let round = 0; round < 2; round++) {
      const copies: Buffer[] = [];
      const lent: Buffer[] = [];
      for await (const c of dumpPath(dir, { recycle: true })) {
        copies.push(Buffer.from(c)); // the consumer is done with it before asking for the next one
        lent.push(c);
      }
      expect(Buffer.concat(copies).equals(whole)).toBe(true);
      expect(lent.length).toBeGreaterThan(9);
      // Each chunk's memory went back to the worker (the old views are empty: their buffer was transferred), but the
      // last ones, which wait in the pool for the next dump.
      expect(lent.filter((c) => c.length === 0).length).toBeGreaterThanOrEqual(lent.length - 2);
    }
    // Without recycle, chunks are the consumer's to keep.
    const kept: Buffer[] = [];
    for await (const c of dumpPath(dir)) kept.push(c);
    expect(Buffer.concat(kept).equals(whole)).toBe(true);
  });

  it('stays exact when chunks of both kinds are in use at once', async () => {
    const dir = makeTree();
    const whole = await dumpPathToBuffer(dir);
    const lent = dumpPath(dir, { recycle: true });
    const kept: Buffer[] = [];
    const copies: Buffer[] = [];
    for (;;) {
      const a = await lent.next();
      if (a.done) break;
      copies.push(Buffer.from(a.value));
      // A dump whose chunks are kept, in between, must never receive a buffer that is still lent out.
      for await (const c of dumpPath(join(dir, 'small'))) kept.push(c);
    }
    expect(Buffer.concat(copies).equals(whole)).toBe(true);
    const small = await dumpPathToBuffer(join(dir, 'small'));
    for (const k of kept) expect(k.equals(small)).toBe(true);
  });
});

describe('WireWriter.writeBorrowed', () => {
  it('copies a small chunk into the batch and is done with it at once', async () => {
    const seen: Buffer[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _enc, _cb) {
        seen.push(Buffer.from(chunk)); // never calls back: the copy is what was written
      },
    });
    const w = new WireWriter(sink);
    w.u64(1);
    const small = Buffer.from('lent');
    await w.writeBorrowed(small);
    small.fill(0);
    expect(Buffer.concat(seen).subarray(8).toString()).toBe('lent');
  });

  it('resolves only after the sink has called back for the chunk, after what was batched', async () => {
    const seen: Buffer[] = [];
    let release: (() => void) | null = null;
    const sink = new Writable({
      highWaterMark: 1 << 30,
      write(chunk: Buffer, _enc, cb) {
        seen.push(Buffer.from(chunk));
        if (chunk.length > 1000) release = cb;
        else cb();
      },
    });
    const w = new WireWriter(sink);
    w.u64(7);
    const big = Buffer.alloc(100 * 1024, 1); // more than a batch: written as it is, not copied
    let done = false;
    const p = w.writeBorrowed(big).then(() => {
      done = true;
    });
    await new Promise((r) => setTimeout(r, 20));
    expect(done).toBe(false);
    expect(release).not.toBeNull();
    release!();
    await p;
    expect(done).toBe(true);
    expect(Buffer.concat(seen).equals(Buffer.concat([Buffer.from([7, 0, 0, 0, 0, 0, 0, 0]), big]))).toBe(true);
    expect(w.written).toBe(8 + 100 * 1024);
  });

  it('rejects when the sink closes while holding the chunk, instead of waiting forever', async () => {
    const sink = new Writable({
      write(_chunk, _enc, _cb) {
        setTimeout(() => sink.destroy(), 10); // never calls back, like ssh2 waiting for window on a closed channel
      },
    });
    sink.on('error', () => {});
    const w = new WireWriter(sink);
    await expect(w.writeBorrowed(Buffer.alloc(100 * 1024))).rejects.toThrow('connection closed');
  });
});
