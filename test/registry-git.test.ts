import { rmSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, test } from 'vitest';
import type { Registry } from '../src/registry.js';
import { GitRegistrySource, type RejectedCommit } from '../src/registry-git.js';
import { run, tempDir } from './helpers/exec.js';
import { makeKeys, type TestKeys, writeTree } from './helpers/registry-fixtures.js';

let K: TestKeys;
const dirs: Array<{ cleanup: () => void }> = [];
const sources: GitRegistrySource[] = [];
beforeAll(async () => {
  K = await makeKeys(4);
});
afterEach(async () => {
  for (const s of sources.splice(0)) await s.close();
});
afterAll(() => {
  K?.cleanup();
  for (const d of dirs) d.cleanup();
});

const GIT_ENV = {
  ...process.env,
  GIT_CONFIG_GLOBAL: '/dev/null',
  GIT_CONFIG_NOSYSTEM: '1',
  GIT_AUTHOR_NAME: 'test',
  GIT_AUTHOR_EMAIL: 'test@example.org',
  GIT_COMMITTER_NAME: 'test',
  GIT_COMMITTER_EMAIL: 'test@example.org',
};

async function git(cwd: string, ...args: string[]): Promise<string> {
  return (await run('git', args, { cwd, env: GIT_ENV })).stdout.trim();
}

function blobOf(pub: string): Buffer {
  return Buffer.from(pub.split(' ')[1]!, 'base64');
}

/** A registry repository: a bare "origin" (the URL the box follows) and a work clone to commit from. */
async function setupRepo() {
  const t = tempDir('buildbox-git-');
  dirs.push(t);
  const origin = join(t.path, 'origin.git');
  const work = join(t.path, 'work');
  await git(t.path, 'init', '--quiet', '--bare', '--initial-branch=main', origin);
  await git(t.path, 'init', '--quiet', '--initial-branch=main', work);
  const commit = async (files: Record<string, string>, msg: string, remove: string[] = []) => {
    writeTree(work, files);
    for (const r of remove) unlinkSync(join(work, r));
    await git(work, 'add', '-A');
    await git(work, 'commit', '--quiet', '-m', msg);
    await git(work, 'push', '--quiet', origin, 'HEAD:main');
    return git(work, 'rev-parse', 'HEAD');
  };
  const first = await commit(
    { 'users.nix': '{\n  alice = { keys = ./keys/alice; };\n}\n', 'keys/alice': `${K.ed[0]!.pub}\n` },
    'alice',
  );
  return { root: t.path, origin, work, commit, first, state: join(t.path, 'state', 'registry-git') };
}

function nextEvent<T>(s: GitRegistrySource, name: string, ms = 5000): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no '${name}' within ${ms} ms`)), ms);
    s.once(name, (v: T) => {
      clearTimeout(timer);
      resolve(v);
    });
  });
}

function source(opts: ConstructorParameters<typeof GitRegistrySource>[0]): GitRegistrySource {
  const s = new GitRegistrySource(opts);
  sources.push(s);
  return s;
}

describe('GitRegistrySource', () => {
  test('clones, applies good commits, refuses broken ones and keeps the last good registry', async () => {
    const r = await setupRepo();
    const s = source({ url: r.origin, dir: r.state, intervalMs: 0 });
    const reg = await s.start();
    expect([...reg.users.keys()]).toEqual(['alice']);
    expect(reg.source).toBe(`git ${r.first}`);
    expect(s.status()).toMatchObject({
      url: r.origin,
      branch: 'main',
      appliedCommit: r.first,
      users: 1,
      lastFetchError: null,
      rejected: null,
      lastError: null,
    });
    expect(s.authorize('alice', 'ssh-ed25519', blobOf(K.ed[0]!.pub))?.name).toBe('alice');

    // A new user, committed and pushed: applied on refresh.
    const c2 = await r.commit(
      {
        'users.nix': '{\n  alice = { keys = ./keys/alice; };\n  bob = { keys = ./keys/bob; };\n}\n',
        'keys/bob': `${K.ed[1]!.pub}\n`,
      },
      'bob',
    );
    const changed = nextEvent<Registry>(s, 'change');
    expect(await s.refresh()).toBe('applied');
    expect([...(await changed).users.keys()]).toEqual(['alice', 'bob']);
    expect(s.authorize('bob', 'ssh-ed25519', blobOf(K.ed[1]!.pub))?.name).toBe('bob');
    expect(s.status().appliedCommit).toBe(c2);
    expect(await s.refresh()).toBe('unchanged');

    // A broken commit: refused with its hash and problems; bob keeps working.
    const bad = await r.commit(
      {
        'users.nix': '{\n  alice = { keys = ./keys/alice; };\n  bob = { keys = ./keys/bob; }\n  eve = import ./x;\n}\n',
      },
      'broken',
    );
    const rejected = nextEvent<RejectedCommit>(s, 'rejected');
    expect(await s.refresh()).toBe('rejected');
    expect((await rejected).commit).toBe(bad);
    expect(s.status().rejected).toMatchObject({
      commit: bad,
      problems: [
        'users.nix:3:31: missing `;` after the value of `bob`',
        'users.nix:4:9: `import` is not allowed (plain data only)',
      ],
    });
    expect(s.status().lastError!.message).toBe(
      `commit ${bad.slice(0, 12)} rejected: users.nix:3:31: missing \`;\` after the value of \`bob\` (and 1 more)`,
    );
    expect(s.status().appliedCommit).toBe(c2);
    expect(s.authorize('bob', 'ssh-ed25519', blobOf(K.ed[1]!.pub))?.name).toBe('bob');
    // The same bad commit is not re-checked (or re-logged) on every fetch.
    expect(await s.refresh()).toBe('rejected');

    // A commit that fails the lint in other ways (a private key, a key file outside the repository) too.
    writeFileSync(
      join(r.work, 'users.nix'),
      '{\n  alice = { keys = ./keys/alice; };\n  bob = { keys = ./keys/bob; };\n}\n',
    );
    rmSync(join(r.work, 'keys/bob'));
    symlinkSync('/etc/passwd', join(r.work, 'keys/bob'));
    const evil = await r.commit({ 'keys/alice': `${K.ed[0]!.pub}\n${K.ed[2]!.priv}` }, 'evil');
    expect(await s.refresh()).toBe('rejected');
    expect(s.status().rejected!.commit).toBe(evil);
    expect(s.status().rejected!.problems).toEqual([
      'keys/alice:2:1: PRIVATE KEY (-----BEGIN OPENSSH PRIVATE KEY-----): this is a secret key, and it is now public. Remove it (also from the git history), treat it as compromised, make a new key pair and add only the public key (the .pub file)',
      'users.nix:3:18: key file keys/bob points outside the registry directory',
    ]);

    // Fixed, and bob removed: applied; bob refused from now on.
    rmSync(join(r.work, 'keys/bob'));
    const c5 = await r.commit(
      { 'users.nix': '{\n  alice = { keys = ./keys/alice; };\n}\n', 'keys/alice': `${K.ed[0]!.pub}\n` },
      'fix',
    );
    expect(await s.refresh()).toBe('applied');
    expect(s.status()).toMatchObject({ appliedCommit: c5, rejected: null, lastError: null, users: 1 });
    expect(s.authorize('bob', 'ssh-ed25519', blobOf(K.ed[1]!.pub))).toBeUndefined();
  });

  test('fetches on its interval by itself', async () => {
    const r = await setupRepo();
    const s = source({ url: r.origin, dir: r.state, intervalMs: 100 });
    await s.start();
    const changed = nextEvent<Registry>(s, 'change');
    await r.commit(
      {
        'users.nix': '{\n  alice = { keys = ./keys/alice; };\n  carol = { keys = ./keys/carol; };\n}\n',
        'keys/carol': `${K.ed[3]!.pub}\n`,
      },
      'carol',
    );
    const reg = await changed;
    expect(reg.users.has('carol')).toBe(true);
    expect(s.authorize('carol', 'ssh-ed25519', blobOf(K.ed[3]!.pub))?.name).toBe('carol');
  });

  test('offline: a bad URL after the clone is logged, not fatal; the clone keeps serving', async () => {
    const r = await setupRepo();
    const first = source({ url: r.origin, dir: r.state, intervalMs: 0 });
    await first.start();
    await first.close();

    const warnings: string[] = [];
    const logger = {
      info: () => {},
      warn: (o: object, m?: string) => warnings.push(`${m}: ${(o as { err: string }).err}`),
      error: () => {},
    };
    const s = source({ url: join(r.root, 'gone.git'), dir: r.state, intervalMs: 0, logger });
    const failed = nextEvent<string>(s, 'fetch-failed');
    const reg = await s.start();
    expect(await failed).toMatch(/^fatal: .*gone\.git/);
    expect([...reg.users.keys()]).toEqual(['alice']);
    expect(s.authorize('alice', 'ssh-ed25519', blobOf(K.ed[0]!.pub))?.name).toBe('alice');
    const st = s.status();
    expect(st.appliedCommit).toBe(r.first);
    expect(st.lastFetchError).toMatch(/gone\.git/);
    expect(st.lastError!.message).toMatch(/^fetch failed: fatal: .*gone\.git/);
    expect(warnings).toEqual([expect.stringMatching(/^registry fetch failed; keeping the registry we have: fatal:/)]);
    expect(await s.refresh()).toBe('unchanged');
  });

  test('no clone and no network: starts empty, reports, and picks the registry up once reachable', async () => {
    const r = await setupRepo();
    const s = source({ url: join(r.root, 'not-yet.git'), dir: r.state, intervalMs: 0 });
    const reg = await s.start();
    expect(reg.users.size).toBe(0);
    expect(s.status()).toMatchObject({ appliedCommit: null, users: 0 });
    expect(s.status().lastError!.message).toMatch(/^fetch failed:/);
    // The repository appears at that URL.
    await run('cp', ['-a', r.origin, join(r.root, 'not-yet.git')]);
    expect(await s.refresh()).toBe('applied');
    expect(s.registry.users.has('alice')).toBe(true);
    expect(s.status().lastError).toBeNull();
  });

  test('a branch that does not exist, and a commit without users.nix', async () => {
    const r = await setupRepo();
    const s = source({ url: r.origin, branch: 'registry', dir: r.state, intervalMs: 0 });
    await s.start();
    expect(s.status().lastFetchError).toMatch(/couldn't find remote ref refs\/heads\/registry/);
    const other = await setupRepo();
    rmSync(join(other.work, 'users.nix'));
    const c = await other.commit({ 'README.md': 'nothing here\n' }, 'no users');
    const s2 = source({ url: other.origin, dir: other.state, intervalMs: 0 });
    await s2.start();
    expect(s2.status().rejected).toMatchObject({ commit: c, problems: ['cannot read users.nix: ENOENT'] });
    expect(s2.registry.users.size).toBe(0);
  });
});
