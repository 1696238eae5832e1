/**
 * Issue 7 end to end: a box following a registry in git. A merged commit adding a user is live within the interval,
 * a broken commit is refused while the box keeps serving with the last good registry, a removed user is refused from
 * the next session on — checked with the real Nix client.
 */
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBox, type TestBox, type TestUser } from './helpers/box.js';
import { run } from './helpers/exec.js';
import { nix28 } from './helpers/nix.js';

let tb: TestBox;
let work: string;

const git = (...args: string[]) =>
  run('git', ['-C', work, ...args], {
    env: {
      ...process.env,
      GIT_AUTHOR_NAME: 't',
      GIT_AUTHOR_EMAIL: 't@x',
      GIT_COMMITTER_NAME: 't',
      GIT_COMMITTER_EMAIL: 't@x',
    },
  });

async function commitRegistry(users: Record<string, TestUser>, names: string[], message: string, raw?: string) {
  rmSync(join(work, 'keys'), { recursive: true, force: true });
  mkdirSync(join(work, 'keys'));
  for (const n of names) writeFileSync(join(work, 'keys', n), `${users[n]!.publicKey}\n`);
  writeFileSync(
    join(work, 'users.nix'),
    raw ?? `{\n${names.map((n) => `  ${n} = { keys = ./keys/${n}; };\n`).join('')}}\n`,
  );
  await git('add', '-A');
  await git('commit', '-qm', message);
  await git('push', '-q', 'origin', 'main');
}

beforeAll(async () => {
  tb = await startTestBox({
    users: ['alice', 'dave'],
    prepare: async (dir, users) => {
      const bare = join(dir, 'registry.git');
      work = join(dir, 'registry-work');
      await run('git', ['init', '-q', '--bare', '-b', 'main', bare]);
      await run('git', ['init', '-q', '-b', 'main', work]);
      await git('remote', 'add', 'origin', bare);
      await commitRegistry(users, ['alice'], 'alice joins');
      return { registry: { path: work, git: bare, branch: 'main', interval: 1 } };
    },
  });
});
afterAll(async () => {
  await tb?.stop();
});

const ping = async (user: string) =>
  (await tb.nix(nix28, 'nix', ['store', 'ping', '--store', `ssh://${user}@box`], { allowFail: true })).code === 0;

async function waitFor(cond: () => Promise<boolean>, timeoutMs = 20_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 300));
  }
  throw new Error('condition not met in time');
}

describe('registry from git', () => {
  it('applies a merged commit, refuses a broken one, and drops a removed user', async () => {
    expect(await ping('alice')).toBe(true);
    expect(await ping('dave')).toBe(false);
    await commitRegistry(tb.users, ['alice', 'dave'], 'dave joins');
    await waitFor(() => ping('dave'));
    const before = tb.box.registry.status();
    await commitRegistry(tb.users, ['alice', 'dave'], 'broken', '{ alice = import ./x.nix; }\n');
    await waitFor(async () => tb.box.registry.status().lastError !== null);
    const st = tb.box.registry.status();
    expect(st.lastError).toMatch(/rejected/);
    expect(st.lastError).toMatch(/users\.nix:1:/);
    expect(st.digest).toBe(before.digest);
    expect(await ping('alice')).toBe(true);
    expect(await ping('dave')).toBe(true);
    await commitRegistry(tb.users, ['alice'], 'dave leaves');
    await waitFor(async () => !(await ping('dave')));
    expect(await ping('alice')).toBe(true);
  }, 120_000);
});
