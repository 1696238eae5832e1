/**
 * Issue 3 end to end: real Nix clients (2.8 on the host, 2.26 in the trixie root) copy closures to and from the box
 * over ssh:// through the real OpenSSH client, as registered users whose uploads stay private to them.
 */
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dumpPath } from '../src/nar.js';
import { encodeString, encodeU64 } from '../src/wire.js';
import { startTestBox, type TestBox } from './helpers/box.js';
import { run } from './helpers/exec.js';
import { CLIENTS, nixEnv } from './helpers/nix.js';

let tb: TestBox;

beforeAll(async () => {
  tb = await startTestBox({ users: ['alice', 'bob', 'carol'] });
});
afterAll(async () => {
  await tb?.stop();
});

/** Make a small closure in a client store: busybox (a directory) and a chain of text files referencing it. */
async function makeClosure(
  client: (typeof CLIENTS)[number],
  store: string,
  salt: string,
): Promise<{ top: string; all: string[] }> {
  const dir = join(tb.dir, `src-${salt}`);
  mkdirSync(join(dir, 'bb', 'bin'), { recursive: true });
  writeFileSync(join(dir, 'bb', 'bin', 'busybox'), `#!/bin/sh\necho ${salt}\n`, { mode: 0o755 });
  writeFileSync(join(dir, 'bb', 'data'), 'x'.repeat(100_000) + salt);
  const expr = `let bb = builtins.path { path = ${dir}/bb; name = "busybox"; };
    a = builtins.toFile "a-${salt}" "uses \${bb}";
    b = builtins.toFile "b-${salt}" "uses \${a} and \${bb}";
  in builtins.toFile "top-${salt}" "top \${b}"`;
  const { stdout } = await tb.nix(client.run, 'nix-instantiate', [
    '--store',
    store,
    '--eval',
    '--read-write-mode',
    '-E',
    expr,
  ]);
  const top = JSON.parse(stdout.trim()) as string;
  const closure = await tb.nix(client.run, 'nix-store', ['--store', store, '-qR', top]);
  return { top, all: closure.stdout.trim().split('\n').sort() };
}

describe.each(CLIENTS)('ssh:// with $name', (client) => {
  it('answers nix store ping', async () => {
    const r = await tb.nix(client.run, 'nix', ['store', 'ping', '--store', 'ssh://alice@box']);
    expect(r.code).toBe(0);
  });

  it('copies a closure to the box and back, byte for byte', async () => {
    const src = `local?root=${tb.clientStore(`src-${client.name}`)}`;
    const dst = `local?root=${tb.clientStore(`dst-${client.name}`)}`;
    const { top, all } = await makeClosure(client, src, client.name.replace(/\W/g, ''));
    expect(all).toHaveLength(4);
    await tb.nix(client.run, 'nix', ['copy', '--from', src, '--to', 'ssh://alice@box', top]);
    const info = await tb.nix(client.run, 'nix', ['path-info', '--store', 'ssh://alice@box', '-r', top]);
    expect(info.stdout.trim().split('\n').sort()).toEqual(all);
    await tb.nix(client.run, 'nix', ['copy', '--no-check-sigs', '--from', 'ssh://alice@box', '--to', dst, top]);
    const a = await tb.nix(client.run, 'nix', ['path-info', '--store', src, '--json', '-r', top]);
    const b = await tb.nix(client.run, 'nix', ['path-info', '--store', dst, '--json', '-r', top]);
    const hashes = (j: string) =>
      JSON.parse(j) as
        | Array<{ path: string; narHash: string; references: string[] }>
        | Record<string, { narHash: string }>;
    const norm = (v: ReturnType<typeof hashes>) =>
      Array.isArray(v)
        ? Object.fromEntries(v.map((x) => [x.path, x.narHash]))
        : Object.fromEntries(Object.entries(v).map(([k, x]) => [k, x.narHash]));
    expect(norm(hashes(b.stdout))).toEqual(norm(hashes(a.stdout)));
    // The other user does not see alice's unsigned uploads.
    const bob = await tb.nix(client.run, 'nix', ['path-info', '--store', 'ssh://bob@box', top], { allowFail: true });
    expect(bob.code).not.toBe(0);
    const bobCopy = await tb.nix(
      client.run,
      'nix',
      ['copy', '--no-check-sigs', '--from', 'ssh://bob@box', '--to', dst, top],
      {
        allowFail: true,
      },
    );
    expect(bobCopy.code).not.toBe(0);
  });
});

/** An export stream (`nix-store --export` format) holding `contents` at store path `path`, made with our NAR writer. */
async function exportStream(path: string, contents: string): Promise<Buffer> {
  const d = join(tb.dir, `exp-${Math.random().toString(36).slice(2)}`);
  mkdirSync(d);
  writeFileSync(join(d, 'file'), contents);
  const nar: Buffer[] = [];
  for await (const c of dumpPath(join(d, 'file'))) nar.push(Buffer.from(c));
  return Buffer.concat([
    encodeU64(1),
    ...nar,
    encodeU64(0x4558494e),
    encodeString(path),
    encodeU64(0),
    encodeString(''),
    encodeU64(0),
    encodeU64(0),
  ]);
}

describe('isolation between users', () => {
  it('keeps unsigned uploads private: two users hold different content at the same path', async () => {
    const client = CLIENTS[0]!;
    const X = '/nix/store/0a1b2c3d4f5g6h7i8j9k0l1m2n3p4q5r-conflict';
    const stores: Record<string, string> = {};
    for (const user of ['alice', 'bob']) {
      stores[user] = `local?root=${tb.clientStore(`conflict-${user}`)}`;
      await run('nix-store', ['--store', stores[user]!, '--import'], {
        env: nixEnv(),
        input: await exportStream(X, `${user}'s content\n`),
      });
    }
    await tb.nix(client.run, 'nix', ['copy', '--from', stores.alice!, '--to', 'ssh://alice@box', X]);
    // For bob, alice's X does not exist: not valid, not downloadable.
    expect(
      (await tb.nix(client.run, 'nix', ['path-info', '--store', 'ssh://bob@box', X], { allowFail: true })).code,
    ).not.toBe(0);
    const bobDst = `local?root=${tb.clientStore('conflict-bob-dst')}`;
    expect(
      (
        await tb.nix(client.run, 'nix', ['copy', '--no-check-sigs', '--from', 'ssh://bob@box', '--to', bobDst, X], {
          allowFail: true,
        })
      ).code,
    ).not.toBe(0);
    // bob uploads different content at X; each gets back their own.
    await tb.nix(client.run, 'nix', ['copy', '--from', stores.bob!, '--to', 'ssh://bob@box', X]);
    for (const user of ['alice', 'bob']) {
      const dst = tb.clientStore(`conflict-${user}-back`);
      await tb.nix(client.run, 'nix', [
        'copy',
        '--no-check-sigs',
        '--from',
        `ssh://${user}@box`,
        '--to',
        `local?root=${dst}`,
        X,
      ]);
      expect(readFileSync(join(dst, X), 'utf8')).toBe(`${user}'s content\n`);
    }
  });

  it('stores the same content uploaded by two users once', async () => {
    const store = `local?root=${tb.clientStore('shared-src')}`;
    const client = CLIENTS[0]!;
    const { top, all } = await makeClosure(client, store, 'shared');
    const objects = () => tb.box.store.stats().objects;
    const before = objects();
    await tb.nix(client.run, 'nix', ['copy', '--from', store, '--to', 'ssh://alice@box', top]);
    const afterAlice = objects();
    await tb.nix(client.run, 'nix', ['copy', '--from', store, '--to', 'ssh://bob@box', top]);
    expect(afterAlice - before).toBe(all.length);
    expect(objects()).toBe(afterAlice);
    for (const user of ['alice', 'bob']) {
      const r = await tb.nix(client.run, 'nix', ['path-info', '--store', `ssh://${user}@box`, '-r', top]);
      expect(r.stdout.trim().split('\n').sort()).toEqual(all);
    }
    const carol = await tb.nix(client.run, 'nix', ['path-info', '--store', 'ssh://carol@box', top], {
      allowFail: true,
    });
    expect(carol.code).not.toBe(0);
  });
});

describe('registry changes', () => {
  it('refuses a removed user from the next session on, and keeps the last good registry on a broken edit', async () => {
    const client = CLIENTS[0]!;
    const ping = (user: string) =>
      tb.nix(client.run, 'nix', ['store', 'ping', '--store', `ssh://${user}@box`], { allowFail: true });
    expect((await ping('carol')).code).toBe(0);
    tb.writeRegistry([{ name: 'alice' }, { name: 'bob' }]);
    await waitFor(async () => (await ping('carol')).code !== 0);
    // A broken edit: the box keeps serving with the last good registry.
    writeFileSync(join(tb.dir, 'registry', 'users.nix'), '{ alice = import ./evil.nix; }\n');
    await new Promise((r) => setTimeout(r, 3000));
    expect((await ping('alice')).code).toBe(0);
    expect((await ping('bob')).code).toBe(0);
    expect(tb.box.registry.status().lastError).toMatch(/users\.nix:1:/);
    tb.writeRegistry([{ name: 'alice' }, { name: 'bob' }, { name: 'carol' }]);
    await waitFor(async () => (await ping('carol')).code === 0);
  });
});

async function waitFor(cond: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 250));
  }
  throw new Error('condition not met in time');
}

describe('front door', () => {
  it('refuses unknown users and keys, and commands that are not Nix protocols', async () => {
    const ssh = (user: string, cmd: string) =>
      run('ssh', ['-F', tb.sshConfig, `${user}@box`, cmd], { allowFail: true, timeoutMs: 20_000 });
    const unknown = await ssh('mallory', 'nix-store --serve');
    expect(unknown.code).toBe(255);
    expect(unknown.stderr).toMatch(/Permission denied \(publickey\)/);
    const shell = await ssh('alice', 'ls /');
    expect(shell.code).toBe(1);
    expect(shell.stderr).toContain('buildbox only speaks the Nix remote-store protocols');
    // carol's key presented for alice is refused.
    const wrongKey = await run(
      'ssh',
      [
        '-F',
        '/dev/null',
        '-o',
        `UserKnownHostsFile=${join(tb.dir, 'known_hosts')}`,
        '-o',
        'StrictHostKeyChecking=yes',
        '-o',
        'BatchMode=yes',
        '-o',
        'IdentitiesOnly=yes',
        '-i',
        tb.users.carol!.key,
        '-p',
        String(tb.port),
        'alice@127.0.0.1',
        'nix-store --serve',
      ],
      { allowFail: true, timeoutMs: 20_000 },
    );
    expect(wrongKey.stderr).toMatch(/Permission denied \(publickey\)/);
    expect(wrongKey.code).toBe(255);
  });
});
