/**
 * The serve protocol handler over in-memory streams: version gating of replies, ExportPaths order, and backpressure
 * (a client that does not read never makes the box buffer a whole NAR).
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough, Writable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { hashBytes } from '../src/hash.js';
import { silentLogger } from '../src/logger.js';
import { dumpPath } from '../src/nar.js';
import { runServe } from '../src/serve-protocol.js';
import type { Session } from '../src/session.js';
import { Store } from '../src/store.js';
import { WireReader, WireWriter } from '../src/wire.js';
import { tempDir } from './helpers/exec.js';

let t: ReturnType<typeof tempDir>;
let store: Store;

beforeEach(() => {
  t = tempDir();
  store = Store.open({ stateDir: join(t.path, 'state'), persist: false, trustedPublicKeys: [] });
});
afterEach(() => {
  store.close();
  t.cleanup();
});

async function narOf(path: string): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of dumpPath(path)) parts.push(Buffer.from(c));
  return Buffer.concat(parts);
}

function start(user: string, write = true, output: Writable = new PassThrough()) {
  const input = new PassThrough();
  const stderr = new PassThrough();
  const ac = new AbortController();
  const session: Session = {
    id: `s-${Math.random()}`,
    user,
    store,
    builder: {} as never,
    logger: silentLogger(),
    signal: ac.signal,
  };
  const done = runServe(session, { input, output, stderr }, { write });
  const r = output instanceof PassThrough ? new WireReader(output) : (undefined as unknown as WireReader);
  return { w: new WireWriter(input), r, input, output, stderr, done, ac };
}

async function upload(s: ReturnType<typeof start>, path: string, nar: Buffer, refs: string[] = []) {
  s.w
    .u64(9)
    .string(path)
    .string('')
    .string(hashBytes('sha256', nar).toBase16())
    .strings(refs)
    .u64(0)
    .u64(nar.length)
    .u64(0)
    .u64(0)
    .string('');
  s.w.raw(nar);
  await s.w.flush();
  expect(await s.r.readU64()).toBe(1);
}

const P = (h: string, n: string) => `/nix/store/${h.padEnd(32, '0')}-${n}`;

describe('serve protocol', () => {
  it('gates path-info fields on the client version and exports dependencies first', async () => {
    writeFileSync(join(t.path, 'a'), 'A');
    writeFileSync(join(t.path, 'b'), `B ${P('aa', 'a')}`);
    const a = P('aa', 'a');
    const b = P('bb', 'b');
    const s = start('alice');
    s.w.u64(0x390c9deb).u64(0x207);
    await s.w.flush();
    expect(await s.r.readU64()).toBe(0x5452eecb);
    expect(await s.r.readU64()).toBe(0x207);
    await upload(s, a, await narOf(join(t.path, 'a')));
    await upload(s, b, await narOf(join(t.path, 'b')), [a]);
    s.w.u64(2).strings([b, P('cc', 'missing')]);
    await s.w.flush();
    expect(await s.r.readString()).toBe(b);
    expect(await s.r.readString()).toBe(''); // deriver
    expect(await s.r.readStrings()).toEqual([a]);
    const size = await s.r.readU64();
    expect(await s.r.readU64()).toBe(size);
    expect(await s.r.readString()).toMatch(/^sha256:[0-9a-z]{52}$/);
    expect(await s.r.readString()).toBe('');
    expect(await s.r.readStrings()).toEqual([]);
    expect(await s.r.readString()).toBe(''); // end of infos: the missing path is skipped
    s.w.u64(7).u64(0).strings([b]);
    await s.w.flush();
    expect((await s.r.readStrings()).sort()).toEqual([a, b]);
    s.w.u64(5).u64(0).strings([b, a]);
    await s.w.flush();
    const order: string[] = [];
    while ((await s.r.readU64()) === 1) {
      await s.r.expectString('nix-archive-1');
      // skip the NAR body: "(" "type" "regular" "contents" <data> ")"
      for (let i = 0; i < 4; i++) await s.r.readBytes();
      await s.r.readBytes();
      await s.r.readBytes();
      expect(await s.r.readU64()).toBe(0x4558494e);
      order.push(await s.r.readString());
      await s.r.readStrings();
      await s.r.readString();
      expect(await s.r.readU64()).toBe(0);
    }
    expect(order).toEqual([a, b]);
    s.input.end();
    expect(await s.done).toBe(0);
  });

  it('applies backpressure: a client that does not read holds the box to a bounded buffer', async () => {
    const big = Buffer.alloc(48 * 1024 * 1024, 7);
    writeFileSync(join(t.path, 'big'), big);
    const path = P('dd', 'big');
    const up = start('alice');
    up.w.u64(0x390c9deb).u64(0x207);
    await up.w.flush();
    await up.r.readU64();
    await up.r.readU64();
    await upload(up, path, await narOf(join(t.path, 'big')));
    up.input.end();
    await up.done;
    // A sink that accepts 64 KiB and then stalls until released.
    let release: (() => void) | undefined;
    let accepted = 0;
    const slow = new Writable({
      highWaterMark: 64 * 1024,
      write(chunk: Buffer, _enc, cb) {
        accepted += chunk.length;
        if (accepted > 1024 * 1024 && !release) release = cb;
        else if (!release) cb();
        else setTimeout(cb, 0);
      },
    });
    const s = start('alice', false, slow);
    s.w.u64(0x390c9deb).u64(0x207).u64(3).string(path);
    await s.w.flush();
    await new Promise((r) => setTimeout(r, 1000));
    const buffered = slow.writableLength;
    expect(accepted).toBeLessThan(4 * 1024 * 1024);
    expect(buffered).toBeLessThan(4 * 1024 * 1024);
    s.ac.abort();
    release?.();
    s.input.end();
  });
});
