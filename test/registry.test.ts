import { mkdirSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import {
  findUserKey,
  formatProblem,
  loadRegistry,
  type Registry,
  RegistryReadError,
  RegistryWatcher,
  userNameProblem,
} from '../src/registry.js';
import { tempDir } from './helpers/exec.js';
import { makeKeys, type TestKeys, writeTree } from './helpers/registry-fixtures.js';

let K: TestKeys;
const dirs: Array<{ cleanup: () => void }> = [];
beforeAll(async () => {
  K = await makeKeys(6);
});
afterAll(() => {
  K?.cleanup();
  for (const d of dirs) d.cleanup();
});

function newDir(): string {
  const t = tempDir('buildbox-registry-');
  dirs.push(t);
  return t.path;
}

function blobOf(pub: string): Buffer {
  return Buffer.from(pub.split(' ')[1]!, 'base64');
}

function problems(r: Registry, base: string): string[] {
  return r.problems.map((p) => formatProblem(p, base));
}

describe('loading', () => {
  test('attribute-set form: fields, unknown fields kept, quoted names, keys relative to the file', async () => {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': [
        '# the registry',
        '{',
        '  "0x4A6F" = { trusted = true; keys = ./keys/0x4A6F; };',
        '  alice = {',
        '    trusted = true;',
        '    sudo = true;',
        '    keys = ./keys/alice;',
        '    jobs = 4;',
        '    vouchedBy = [ "0x4A6F" ];',
        '    password = "$6$x";',
        '    github = { handle = "alice"; id = 7; };',
        '  };',
        '  bob = { keys = keys/bob; };',
        '}',
      ].join('\n'),
      'keys/0x4A6F': `${K.ed[0]!.pub}\n`,
      'keys/alice': `# alice's keys\n${K.ed[1]!.pub}\n${K.ecdsa384.pub}\n${K.skEd}\ncert-authority ${K.ed[2]!.pub}\n`,
      'keys/bob': `${K.rsa3072.pub}\n`,
    });
    const r = await loadRegistry(dir);
    expect(problems(r, dir)).toEqual([]);
    expect([...r.users.keys()]).toEqual(['0x4A6F', 'alice', 'bob']);
    const alice = r.users.get('alice')!;
    expect(alice).toMatchObject({
      name: 'alice',
      trusted: true,
      sudo: true,
      jobs: 4,
      vouchedBy: ['0x4A6F'],
      extra: { password: '$6$x', github: { handle: 'alice', id: 7 } },
      keyFile: join(r.dir, 'keys/alice'),
      line: 4,
      col: 3,
    });
    expect(alice.keys.map((k) => k.type)).toEqual(['ssh-ed25519', 'ecdsa-sha2-nistp384']);
    expect(alice.unusableKeys.map((k) => k.unusableReason)).toEqual([
      'security-key (FIDO) key `sk-ssh-ed25519@openssh.com`: not usable by the built-in server; use the OpenSSH front door',
      'cert-authority key: not usable by the built-in server; use the OpenSSH front door',
    ]);
    expect(r.users.get('bob')).toMatchObject({ trusted: false, sudo: false, vouchedBy: [], extra: {} });
    expect(r.users.get('bob')!.jobs).toBeUndefined();
  });

  test('list form gives the same users', async () => {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': [
        '[',
        '  { name = "alice"; trusted = true; keys = ./keys/alice; }',
        '  # bob is new',
        '  { name = "bob"; keys = ./keys/bob; vouchedBy = [ "alice" ]; note = "hi"; }',
        ']',
      ].join('\n'),
      'keys/alice': `${K.ed[0]!.pub}\n`,
      'keys/bob': `${K.ed[1]!.pub}\n`,
    });
    const r = await loadRegistry(dir);
    expect(problems(r, dir)).toEqual([]);
    expect(r.users.get('alice')).toMatchObject({ trusted: true, line: 2, col: 12 });
    expect(r.users.get('bob')).toMatchObject({ vouchedBy: ['alice'], extra: { note: 'hi' } });
  });

  test('a users file elsewhere: keys resolve relative to that file', async () => {
    const dir = newDir();
    writeTree(dir, {
      'conf/registry.nix': '{ alice = { keys = ./keys/alice; }; }',
      'conf/keys/alice': `${K.ed[0]!.pub}\n`,
    });
    const r = await loadRegistry(dir, { usersFile: 'conf/registry.nix' });
    expect(problems(r, dir)).toEqual([]);
    expect(r.users.get('alice')!.keyFile).toBe(join(r.dir, 'conf/keys/alice'));
  });

  test('a missing users.nix is an empty registry only when the caller says so', async () => {
    const dir = newDir();
    const r = await loadRegistry(dir, { allowMissing: true });
    expect(r.users.size).toBe(0);
    expect(r.missing).toBe(true);
    expect(r.problems).toEqual([]);
    await expect(loadRegistry(dir)).rejects.toThrow(RegistryReadError);
    await expect(loadRegistry(dir)).rejects.toThrow(/cannot read .*users\.nix: ENOENT/);
    await expect(loadRegistry(join(dir, 'nope'), { allowMissing: true })).rejects.toThrow(
      /cannot read registry directory .*nope: ENOENT/,
    );
  });

  test('broken entries are left out with their problems; good users still load', async () => {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': [
        '{',
        '  alice = { keys = ./keys/alice; trusted = "yes"; };',
        '  bob = { keys = ./keys/bob; };',
        '  carol = { keys = ./keys/carol; };',
        '  dave = { trusted = true; };',
        '  "bad name" = { keys = ./keys/bob; };',
        '  erin = { keys = /etc/passwd; };',
        '  frank = { keys = ./keys/link; };',
        '}',
      ].join('\n'),
      'keys/alice': `${K.ed[0]!.pub}\n`,
      'keys/bob': `${K.ed[1]!.pub}\n${K.rsa1024.pub}\n`,
    });
    symlinkSync('/etc/passwd', join(dir, 'keys/link'));
    const r = await loadRegistry(dir);
    expect([...r.users.keys()]).toEqual(['bob']);
    expect(r.users.get('bob')!.keys.length).toBe(1);
    expect(problems(r, dir)).toEqual([
      'keys/bob:2:1: RSA key of 1024 bits is too weak: at least 2048 bits are required (make a new key: ssh-keygen -t ed25519)',
      'users.nix:2:44: `trusted` must be true or false',
      'users.nix:4:20: key file keys/carol of user "carol" does not exist',
      'users.nix:5:3: user "dave" has no key file (add keys = ./keys/dave;)',
      'users.nix:6:3: invalid user name "bad name": a unix login name uses only A-Z a-z 0-9 . _ -',
      'users.nix:6:25: key file keys/bob is already used by user "bob"',
      'users.nix:7:19: `keys` must be a relative path inside the registry (./keys/erin)',
      'users.nix:8:20: key file keys/link points outside the registry directory',
    ]);
  });

  test('a syntax error loads no users and says where', async () => {
    const dir = newDir();
    writeTree(dir, { 'users.nix': 'let x = 1; in { }', 'keys/alice': `${K.ed[0]!.pub}\n` });
    const r = await loadRegistry(dir);
    expect(r.users.size).toBe(0);
    // The box's load leaves lint-only findings (the unused key file) to `users check`.
    expect(problems(r, dir)).toEqual(['users.nix:1:1: `let … in` is not allowed (plain data only)']);
  });

  test('unix login names', () => {
    expect(userNameProblem('alice')).toBeUndefined();
    expect(userNameProblem('0x4A6F')).toBeUndefined();
    expect(userNameProblem('Profpatsch')).toBeUndefined();
    expect(userNameProblem('cole-h')).toBeUndefined();
    expect(userNameProblem('a.b_c')).toBeUndefined();
    expect(userNameProblem('-x')).toBe(`invalid user name "-x": it must not start with '-'`);
    expect(userNameProblem('1234')).toBe('invalid user name "1234": it must not be all digits (that reads as a uid)');
    expect(userNameProblem('a'.repeat(33))).toMatch(/longer than 32/);
    expect(userNameProblem('a/b')).toMatch(/uses only/);
    expect(userNameProblem('..')).toBe('invalid user name ".."');
    expect(userNameProblem('')).toBe('the user name is empty');
  });
});

describe('authorization', () => {
  test('by user name and key blob; RSA under rsa-sha2-*; unusable and expired keys refused', async () => {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': '{ alice = { keys = ./keys/alice; }; bob = { keys = ./keys/bob; }; }',
      'keys/alice': `${K.ed[0]!.pub}\n${K.rsa3072.pub}\n${K.skEd}\nexpiry-time="20200101" ${K.ed[2]!.pub}\n`,
      'keys/bob': `${K.ed[1]!.pub}\n`,
    });
    const r = await loadRegistry(dir);
    expect(findUserKey(r, 'alice', 'ssh-ed25519', blobOf(K.ed[0]!.pub))?.user.name).toBe('alice');
    expect(findUserKey(r, 'alice', 'ssh-ed25519', blobOf(K.ed[0]!.pub))?.key.fingerprint).toMatch(/^SHA256:/);
    expect(findUserKey(r, 'alice', 'rsa-sha2-512', blobOf(K.rsa3072.pub))?.user.name).toBe('alice');
    expect(findUserKey(r, 'alice', 'ssh-ed25519', blobOf(K.rsa3072.pub))).toBeUndefined();
    expect(findUserKey(r, 'alice', 'ssh-ed25519', blobOf(K.ed[1]!.pub))).toBeUndefined(); // bob's key
    expect(findUserKey(r, 'bob', 'ssh-ed25519', blobOf(K.ed[1]!.pub))?.user.name).toBe('bob');
    expect(findUserKey(r, 'carol', 'ssh-ed25519', blobOf(K.ed[1]!.pub))).toBeUndefined();
    expect(findUserKey(r, 'alice', 'sk-ssh-ed25519@openssh.com', blobOf(K.skEd))).toBeUndefined();
    expect(findUserKey(r, 'alice', 'ssh-ed25519', blobOf(K.ed[2]!.pub))).toBeUndefined(); // expired
    expect(r.problems.map((p) => p.code)).toEqual(['expired-key']);
  });
});

describe('RegistryWatcher', () => {
  const watchers: RegistryWatcher[] = [];
  afterEach(() => {
    for (const w of watchers.splice(0)) w.close();
  });

  function nextEvent<T = unknown>(w: RegistryWatcher, name: string, ms = 5000): Promise<T> {
    return new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`no '${name}' event within ${ms} ms`)), ms);
      w.once(name, (v: T) => {
        clearTimeout(t);
        resolve(v);
      });
    });
  }

  /** Replace a file the way editors and `users add` do: write a temp file, rename it over. */
  function replace(path: string, content: string): void {
    writeFileSync(`${path}.tmp`, content);
    renameSync(`${path}.tmp`, path);
  }

  async function setup(opts: { watch?: boolean; pollMs?: number } = {}) {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': '{\n  alice = { keys = ./keys/alice; };\n}\n',
      'keys/alice': `${K.ed[0]!.pub}\n${K.ed[1]!.pub}\n`,
    });
    const w = await RegistryWatcher.start({ dir, debounceMs: 30, pollMs: opts.pollMs ?? 100, watch: opts.watch });
    watchers.push(w);
    return { dir, w };
  }

  test('follows edits: new user, removed key, removed user', async () => {
    const { dir, w } = await setup();
    const a0 = blobOf(K.ed[0]!.pub);
    const a1 = blobOf(K.ed[1]!.pub);
    const b = blobOf(K.ed[2]!.pub);
    expect(w.authorize('alice', 'ssh-ed25519', a0)?.name).toBe('alice');
    expect(w.authorize('bob', 'ssh-ed25519', b)).toBeUndefined();

    let changed = nextEvent<Registry>(w, 'change');
    replace(join(dir, 'keys/bob'), `${K.ed[2]!.pub}\n`);
    replace(join(dir, 'users.nix'), '{\n  alice = { keys = ./keys/alice; };\n  bob = { keys = ./keys/bob; };\n}\n');
    await changed;
    expect(w.authorize('bob', 'ssh-ed25519', b)?.name).toBe('bob');

    changed = nextEvent(w, 'change');
    replace(join(dir, 'keys/alice'), `${K.ed[0]!.pub}\n`);
    await changed;
    expect(w.authorize('alice', 'ssh-ed25519', a0)?.name).toBe('alice');
    expect(w.authorize('alice', 'ssh-ed25519', a1)).toBeUndefined();

    changed = nextEvent(w, 'change');
    replace(join(dir, 'users.nix'), '{\n  bob = { keys = ./keys/bob; };\n}\n');
    await changed;
    expect(w.authorize('alice', 'ssh-ed25519', a0)).toBeUndefined();
    expect(w.authorize('bob', 'ssh-ed25519', b)?.name).toBe('bob');
    expect(w.lastError).toBeUndefined();
  });

  test('a broken edit keeps the last good registry and reports where the error is', async () => {
    const { dir, w } = await setup();
    const a0 = blobOf(K.ed[0]!.pub);
    const rejected = nextEvent<{ message: string; problems: Array<{ line: number; col: number; message: string }> }>(
      w,
      'rejected',
    );
    replace(join(dir, 'users.nix'), '{\n  alice = { keys = ./keys/alice; }\n  mallory = import ./x;\n}\n');
    const err = await rejected;
    expect(err.message).toMatch(/has 2 error\(s\); keeping the previous registry$/);
    expect(err.problems.map((p) => formatProblem(p as never, dir))).toEqual([
      'users.nix:2:35: missing `;` after the value of `alice`',
      'users.nix:3:13: `import` is not allowed (plain data only)',
    ]);
    expect(w.lastError?.problems.length).toBe(2);
    expect(w.authorize('alice', 'ssh-ed25519', a0)?.name).toBe('alice');

    // A key file made unreadable as a key file is also a broken edit: alice keeps her key.
    const rejected2 = nextEvent(w, 'rejected');
    replace(join(dir, 'users.nix'), '{\n  alice = { keys = ./keys/alice; };\n}\n');
    replace(join(dir, 'keys/alice'), K.ed[0]!.priv);
    await rejected2;
    expect(w.authorize('alice', 'ssh-ed25519', a0)?.name).toBe('alice');
    expect(w.lastError!.problems[0]!.code).toBe('private-key');

    // Fixed: applied again, error cleared.
    const changed = nextEvent(w, 'change');
    replace(join(dir, 'keys/alice'), `${K.ed[1]!.pub}\n`);
    await changed;
    expect(w.lastError).toBeUndefined();
    expect(w.authorize('alice', 'ssh-ed25519', a0)).toBeUndefined();
    expect(w.authorize('alice', 'ssh-ed25519', blobOf(K.ed[1]!.pub))?.name).toBe('alice');
  });

  test('the stat poll alone notices changes (fs.watch off)', async () => {
    const { dir, w } = await setup({ watch: false, pollMs: 50 });
    const changed = nextEvent(w, 'change');
    replace(join(dir, 'users.nix'), '{ }\n');
    await changed;
    expect(w.registry.users.size).toBe(0);
  });

  test('starting without a registry is an empty one; creating it later is noticed', async () => {
    const dir = newDir();
    const w = await RegistryWatcher.start({ dir, debounceMs: 30, pollMs: 50 });
    watchers.push(w);
    expect(w.registry.users.size).toBe(0);
    expect(w.lastError).toBeUndefined();
    const changed = nextEvent(w, 'change');
    mkdirSync(join(dir, 'keys'));
    replace(join(dir, 'keys/alice'), `${K.ed[0]!.pub}\n`);
    replace(join(dir, 'users.nix'), '{ alice = { keys = ./keys/alice; }; }');
    await changed;
    // The poll may see the key file before users.nix: wait until alice is there.
    while (!w.registry.users.has('alice')) await nextEvent(w, 'change');
    expect(w.authorize('alice', 'ssh-ed25519', blobOf(K.ed[0]!.pub))?.name).toBe('alice');

    // Deleting users.nix empties the registry (a missing file is an empty registry, not an error).
    const emptied = nextEvent(w, 'change');
    rmSync(join(dir, 'users.nix'));
    await emptied;
    expect(w.registry.users.size).toBe(0);
  });

  test('the first load uses the valid part of a broken registry and reports the rest', async () => {
    const dir = newDir();
    writeTree(dir, {
      'users.nix': '{ alice = { keys = ./keys/alice; }; bob = { keys = ./keys/bob; }; }',
      'keys/alice': `${K.ed[0]!.pub}\n`,
    });
    const w = await RegistryWatcher.start({ dir, pollMs: 0 });
    watchers.push(w);
    expect([...w.registry.users.keys()]).toEqual(['alice']);
    expect(w.lastError?.problems.map((p) => formatProblem(p, dir))).toEqual([
      'users.nix:1:52: key file keys/bob of user "bob" does not exist',
    ]);
  });

  test('reload() coalesces and reports unchanged; close() stops everything', async () => {
    const { w } = await setup();
    const [a, b] = await Promise.all([w.reload(), w.reload()]);
    expect([a, b]).toEqual(['unchanged', 'unchanged']);
    w.close();
    let events = 0;
    w.on('change', () => events++);
    await new Promise((r) => setTimeout(r, 150));
    expect(events).toBe(0);
  });
});
