import { spawn } from 'node:child_process';
import { statSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { PassThrough, Readable, Writable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../src/logger.js';
import {
  FRAME_EXIT,
  FRAME_STDERR,
  runSessionClient,
  SESSION_UNREACHABLE,
  type SessionExecRequest,
  type SessionSocketHandle,
  startSessionSocket,
} from '../src/session-socket.js';
import { tempDir } from './helpers/exec.js';

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  while (cleanups.length) await cleanups.pop()!();
});

function tmp(): string {
  const t = tempDir('bbx-sock-');
  cleanups.push(t.cleanup);
  return t.path;
}

async function serve(
  exec: (req: SessionExecRequest) => Promise<number>,
  path = join(tmp(), 'session.sock'),
): Promise<SessionSocketHandle> {
  const h = await startSessionSocket(path, exec, silentLogger());
  cleanups.push(() => h.close());
  return h;
}

function sink(): { w: Writable; data: () => Buffer } {
  const chunks: Buffer[] = [];
  const w = new Writable({
    write(c: Buffer, _e, cb) {
      chunks.push(c);
      cb();
    },
  });
  return { w, data: () => Buffer.concat(chunks) };
}

async function readAll(r: Readable): Promise<Buffer> {
  const out: Buffer[] = [];
  for await (const c of r) out.push(c as Buffer);
  return Buffer.concat(out);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('session socket', () => {
  it('carries user, command, stdin (with half-close), stdout, stderr and the exit status', async () => {
    let seen: Partial<SessionExecRequest> = {};
    const h = await serve(async (req) => {
      seen = {
        user: req.user,
        command: req.command,
        keyFingerprint: req.keyFingerprint,
        remoteAddress: req.remoteAddress,
      };
      const input = await readAll(req.stdin); // ends only when the client half-closed
      req.stderr.write('log line\n');
      req.stdout.write(Buffer.from(input.toString('latin1').toUpperCase(), 'latin1'));
      return 7;
    });
    expect(statSync(h.path).mode & 0o777).toBe(0o660);
    const out = sink();
    const err = sink();
    const code = await runSessionClient(
      h.path,
      'alice',
      'nix-store --serve --write',
      { stdin: Readable.from([Buffer.from('hello '), Buffer.from('world')]), stdout: out.w, stderr: err.w },
      { keyFingerprint: 'SHA256:abc', remoteAddress: '192.0.2.1' },
    );
    expect(code).toBe(7);
    expect(out.data().toString()).toBe('HELLO WORLD');
    expect(err.data().toString()).toBe('log line\n');
    expect(seen).toEqual({
      user: 'alice',
      command: 'nix-store --serve --write',
      keyFingerprint: 'SHA256:abc',
      remoteAddress: '192.0.2.1',
    });
  });

  it('streams large data both ways byte-exact', async () => {
    const h = await serve(async (req) => {
      for await (const c of req.stdin) {
        if (!req.stdout.write(c as Buffer)) await new Promise((r) => req.stdout.once('drain', r));
      }
      return 0;
    });
    const payload = Buffer.alloc(8 * 1024 * 1024 + 13);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7919) & 0xff;
    const out = sink();
    const code = await runSessionClient(h.path, 'bob', 'x', {
      stdin: Readable.from([payload.subarray(0, 3_000_000), payload.subarray(3_000_000)]),
      stdout: out.w,
      stderr: sink().w,
    });
    expect(code).toBe(0);
    expect(out.data().equals(payload)).toBe(true);
  });

  it('applies backpressure to the client when the handler does not read stdin', async () => {
    let pulled = 0;
    const total = 256 * 1024 * 1024;
    const input = new Readable({
      read() {
        if (pulled >= total) {
          this.push(null);
          return;
        }
        pulled += 64 * 1024;
        this.push(Buffer.alloc(64 * 1024, 1));
      },
    });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const h = await serve(async (req) => {
      await gate;
      let n = 0;
      for await (const c of req.stdin) n += (c as Buffer).length;
      req.stdout.write(`${n}`);
      return 0;
    });
    const out = sink();
    const done = runSessionClient(h.path, 'alice', 'x', { stdin: input, stdout: out.w, stderr: sink().w });
    await sleep(600);
    // The handler read nothing yet: only socket buffers and high-water marks may hold data, not the whole input.
    expect(pulled).toBeLessThan(32 * 1024 * 1024);
    release();
    expect(await done).toBe(0);
    expect(out.data().toString()).toBe(String(total));
  });

  it('applies backpressure to the handler when the client does not read stdout', async () => {
    let written = 0;
    const h = await serve(async (req) => {
      const chunk = Buffer.alloc(256 * 1024, 2);
      for (let i = 0; i < 512; i++) {
        await new Promise<void>((resolve, reject) => req.stdout.write(chunk, (e) => (e ? reject(e) : resolve())));
        written += chunk.length;
      }
      return 0;
    });
    let paused = true;
    let received = 0;
    const pending: Array<() => void> = [];
    const slow = new Writable({
      highWaterMark: 64 * 1024,
      write(c: Buffer, _e, cb) {
        received += c.length;
        if (paused) pending.push(cb);
        else cb();
      },
    });
    const done = runSessionClient(h.path, 'alice', 'x', { stdin: Readable.from([]), stdout: slow, stderr: sink().w });
    await sleep(600);
    expect(written).toBeLessThan(32 * 1024 * 1024);
    paused = false;
    for (const cb of pending.splice(0)) cb();
    expect(await done).toBe(0);
    expect(received).toBe(512 * 256 * 1024);
  });

  it('aborts the session signal when the client goes away', async () => {
    let aborted!: () => void;
    const wasAborted = new Promise<void>((r) => (aborted = r));
    const h = await serve(async (req) => {
      req.signal.addEventListener('abort', () => aborted());
      await wasAborted;
      return 0;
    });
    const s = connect(h.path);
    await new Promise((r) => s.once('connect', r));
    s.write(`${JSON.stringify({ 'buildbox-session': 1, user: 'alice', command: 'nix-daemon --stdio' })}\n`);
    await sleep(100);
    s.destroy();
    await wasAborted;
  });

  it('keeps a session whose client half-closed stdin alive while the handler works', async () => {
    const h = await serve(async (req) => {
      await readAll(req.stdin);
      await sleep(2500); // several keep-alive periods with stdin at EOF
      req.stdout.write(req.signal.aborted ? 'aborted' : 'still here');
      return 0;
    });
    const out = sink();
    const code = await runSessionClient(h.path, 'alice', 'x', {
      stdin: Readable.from([]),
      stdout: out.w,
      stderr: sink().w,
    });
    expect(code).toBe(0);
    expect(out.data().toString()).toBe('still here');
  });

  it('refuses a bad header with a message and status 1', async () => {
    const h = await serve(async () => 0);
    for (const header of [
      'not json',
      JSON.stringify({ 'buildbox-session': 1, user: '../x', command: '' }),
      JSON.stringify({ 'buildbox-session': 9, user: 'a', command: '' }),
    ]) {
      const s = connect(h.path);
      s.write(`${header}\n`);
      const reply = await readAll(s);
      expect(reply[0]).toBe(FRAME_STDERR);
      const len = reply.readUInt32BE(1);
      const msg = reply.subarray(5, 5 + len).toString();
      expect(msg).toMatch(/^buildbox: (session header is not JSON|invalid user name|unsupported session protocol)/);
      const exit = reply.subarray(5 + len);
      expect(exit[0]).toBe(FRAME_EXIT);
      expect(exit.readUInt32BE(5)).toBe(1);
    }
  });

  it('says clearly that the box is not running', async () => {
    const path = join(tmp(), 'session.sock');
    const err = sink();
    const stdin = new PassThrough();
    const code = await runSessionClient(path, 'alice', 'nix-store --serve', { stdin, stdout: sink().w, stderr: err.w });
    expect(code).toBe(SESSION_UNREACHABLE);
    expect(err.data().toString()).toMatch(
      /^buildbox: the build box is not running \(nothing listens on .*session\.sock\)/,
    );
    expect(err.data().toString().trim().split('\n')).toHaveLength(1);
  });

  it('replaces a stale socket but refuses to share a live one, and removes its socket on close', async () => {
    const dir = tmp();
    const path = join(dir, 'session.sock');
    const a = await startSessionSocket(path, async () => 0, silentLogger());
    await expect(startSessionSocket(path, async () => 0, silentLogger())).rejects.toThrow(
      /another box is already serving/,
    );
    await a.close();
    expect(() => statSync(path)).toThrow();
    // A stale socket file, as a crashed box leaves it: a process that listened and was killed.
    const child = spawn(process.execPath, [
      '-e',
      `require('net').createServer().listen(${JSON.stringify(path)}, () => console.log('up'))`,
    ]);
    await new Promise((r) => child.stdout.once('data', r));
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));
    expect(statSync(path).isSocket()).toBe(true);
    const b = await startSessionSocket(path, async () => 0, silentLogger());
    await b.close();
    writeFileSync(path, 'not a socket');
    await expect(startSessionSocket(path, async () => 0, silentLogger())).rejects.toThrow(/is not a socket/);
  });
});
