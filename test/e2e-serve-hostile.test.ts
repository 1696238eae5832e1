/**
 * Bad input over ssh:// (issue 3): garbage bytes, an unknown command, a NAR whose hash differs from the declared one,
 * and a connection cut mid-NAR each end that session with a clear error and leave the store exactly as before, while
 * another client's concurrent session carries on. Plus many concurrent connections and the auth timeout.
 */
import { readdirSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hashBytes } from '../src/hash.js';
import { startTestBox, type TestBox } from './helpers/box.js';
import { openRaw, serveHandshake } from './helpers/serve-client.js';

let tb: TestBox;
beforeAll(async () => {
  tb = await startTestBox({ users: ['alice', 'bob'], config: { authTimeout: 2 } });
});
afterAll(async () => {
  await tb?.stop();
});

/** NAR of a regular file with the given contents. */
function fileNar(contents: string): Buffer {
  const parts: Buffer[] = [];
  const str = (s: string | Buffer) => {
    const b = typeof s === 'string' ? Buffer.from(s) : s;
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(b.length));
    parts.push(len, b, Buffer.alloc((8 - (b.length % 8)) % 8));
  };
  for (const t of ['nix-archive-1', '(', 'type', 'regular', 'contents']) str(t);
  str(Buffer.from(contents));
  str(')');
  return Buffer.concat(parts);
}

const PATH_X = '/nix/store/00000000000000000000000000000abc-hostile';

function storeSnapshot(): { objects: string[]; tmp: string[]; stored: number; paths: number } {
  const base = join(tb.box.config.stateDir, 'store');
  const { objects: stored, paths } = tb.box.store.stats();
  return {
    objects: readdirSync(join(base, 'objects')).sort(),
    tmp: readdirSync(join(base, 'tmp')).sort(),
    stored,
    paths,
  };
}

async function addToStoreNar(user: string, nar: Buffer, declared: { hash: string; size: number }, cut = false) {
  const s = openRaw(tb.sshConfig, user, 'nix-store --serve --write');
  await serveHandshake(s);
  s.w.u64(9).string(PATH_X).string('').string(declared.hash).u64(0).u64(0).u64(declared.size).u64(0).u64(0).string('');
  if (cut) {
    s.w.raw(nar.subarray(0, nar.length >> 1));
    await s.w.flush();
    await new Promise((r) => setTimeout(r, 300));
    s.kill();
  } else {
    s.w.raw(nar);
    await s.w.flush();
    s.child.stdin.end();
  }
  const code = await s.exited;
  return { code, stderr: s.stderr(), reply: code === 0 ? 1 : undefined };
}

describe('hostile serve clients', () => {
  it('garbage bytes end the session with a clear error', async () => {
    const before = storeSnapshot();
    const s = openRaw(tb.sshConfig, 'alice', 'nix-store --serve --write');
    s.w.raw(Buffer.from('GET / HTTP/1.1\r\nHost: box\r\n\r\n'));
    await s.w.flush();
    s.child.stdin.end();
    expect(await s.exited).toBe(1);
    expect(s.stderr()).toMatch(/error: protocol mismatch/);
    expect(storeSnapshot()).toEqual(before);
  });

  it('an unknown command number is refused by name', async () => {
    const s = openRaw(tb.sshConfig, 'alice', 'nix-store --serve');
    expect(await serveHandshake(s)).toBe(0x207);
    s.w.u64(42);
    await s.w.flush();
    s.child.stdin.end();
    expect(await s.exited).toBe(1);
    expect(s.stderr()).toContain('error: unknown serve command 42');
  });

  it('a write command without --write is refused', async () => {
    const s = openRaw(tb.sshConfig, 'alice', 'nix-store --serve');
    await serveHandshake(s);
    s.w.u64(9);
    await s.w.flush();
    s.child.stdin.end();
    expect(await s.exited).toBe(1);
    expect(s.stderr()).toContain('not allowed');
  });

  it('a NAR whose hash differs from the declared one registers nothing', async () => {
    const before = storeSnapshot();
    const nar = fileNar('the real content\n');
    const wrong = hashBytes('sha256', fileNar('something else\n')).toBase16();
    const r = await addToStoreNar('alice', nar, { hash: wrong, size: nar.length });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/hash mismatch/i);
    expect(storeSnapshot()).toEqual(before);
    expect(tb.box.store.isValidPath('alice', PATH_X)).toBe(false);
  });

  it('a connection cut mid-NAR registers nothing, while another session carries on', async () => {
    const before = storeSnapshot();
    const big = fileNar('y'.repeat(4 * 1024 * 1024));
    const declared = { hash: hashBytes('sha256', big).toBase16(), size: big.length };
    // bob's concurrent session keeps working throughout.
    const bob = openRaw(tb.sshConfig, 'bob', 'nix-store --serve --write');
    await serveHandshake(bob);
    const cut = addToStoreNar('alice', big, declared, true);
    bob.w.u64(1).u64(0).u64(0).strings([PATH_X]);
    await bob.w.flush();
    expect(await bob.r.readStrings()).toEqual([]);
    const r = await cut;
    expect(r.code).not.toBe(0);
    await new Promise((res) => setTimeout(res, 500));
    expect(storeSnapshot()).toEqual(before);
    expect(tb.box.store.isValidPath('alice', PATH_X)).toBe(false);
    // bob can still upload the very same path afterwards on his open session.
    bob.w
      .u64(9)
      .string(PATH_X)
      .string('')
      .string(declared.hash)
      .u64(0)
      .u64(0)
      .u64(declared.size)
      .u64(0)
      .u64(0)
      .string('');
    bob.w.raw(big);
    await bob.w.flush();
    expect(await bob.r.readU64()).toBe(1);
    bob.child.stdin.end();
    expect(await bob.exited).toBe(0);
    expect(tb.box.store.isValidPath('bob', PATH_X)).toBe(true);
    expect(tb.box.store.isValidPath('alice', PATH_X)).toBe(false);
  });

  it('serves 200 concurrent connections', async () => {
    const n = 200;
    const sessions = Array.from({ length: n }, (_, i) =>
      openRaw(tb.sshConfig, i % 2 ? 'alice' : 'bob', 'nix-store --serve'),
    );
    const versions = await Promise.all(sessions.map((s) => serveHandshake(s)));
    expect(versions.every((v) => v === 0x207)).toBe(true);
    expect(tb.box.ssh.connections()).toBeGreaterThanOrEqual(n);
    for (const s of sessions) s.child.stdin.end();
    const codes = await Promise.all(sessions.map((s) => s.exited));
    expect(codes.every((c) => c === 0)).toBe(true);
  }, 180_000);

  it('drops a connection that never authenticates', async () => {
    const started = Date.now();
    const closed = await new Promise<number>((resolve, reject) => {
      const sock = connect(tb.port, '127.0.0.1');
      sock.on('error', reject);
      sock.on('data', () => {});
      sock.on('close', () => resolve(Date.now() - started));
      sock.write('SSH-2.0-idle_client\r\n');
    });
    expect(closed).toBeGreaterThanOrEqual(1500);
    expect(closed).toBeLessThan(10_000);
  });
});
