/** The registry as the running box uses it: authorization, job limits, status, and keys kept for the OpenSSH door. */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { defaultConfig } from '../src/config.js';
import { publicKeyBlob } from '../src/host-key.js';
import { Registry } from '../src/registry-runtime.js';
import { makeUserKey } from './helpers/box.js';
import { tempDir } from './helpers/exec.js';
import { skLine } from './helpers/registry-fixtures.js';

const cleanups: Array<() => void> = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

describe('registry runtime', () => {
  it('authorizes registered keys, reports limits, and logs keys only the OpenSSH front door can take', async () => {
    const t = tempDir();
    cleanups.push(t.cleanup);
    const alice = await makeUserKey(t.path, 'alice');
    mkdirSync(join(t.path, 'keys'));
    const sk = skLine('ed25519', 'alice@yubikey');
    writeFileSync(join(t.path, 'keys', 'alice'), `${alice.publicKey}\n${sk}\n`);
    writeFileSync(join(t.path, 'users.nix'), '{ alice = { keys = ./keys/alice; jobs = 3; }; }\n');
    const lines: string[] = [];
    const logger = pino(
      { level: 'info' },
      new Writable({
        write(c: Buffer, _e, cb) {
          lines.push(c.toString());
          cb();
        },
      }),
    );
    const reg = await Registry.start(
      { ...defaultConfig(t.path), registry: { path: t.path, git: null, branch: 'main', interval: 300 } },
      logger,
    );
    cleanups.push(() => reg.close());
    const blob = publicKeyBlob(alice.publicKey);
    expect(reg.isAuthorized('alice', 'ssh-ed25519', blob)).toBe(true);
    expect(reg.isAuthorized('bob', 'ssh-ed25519', blob)).toBe(false);
    expect(reg.isAuthorized('alice', 'ssh-ed25519', publicKeyBlob(sk))).toBe(false);
    expect(reg.jobsLimit('alice')).toBe(3);
    expect(reg.jobsLimit('bob')).toBeUndefined();
    expect(reg.status()).toMatchObject({ source: t.path, users: 1, problems: 0, lastError: null });
    const note = lines.map((l) => JSON.parse(l)).find((j) => j.msg === 'key kept for the OpenSSH front door only');
    expect(note).toMatchObject({ user: 'alice', type: 'sk-ssh-ed25519@openssh.com', line: 2 });
    expect(note.reason).toMatch(/OpenSSH front door/);
  });
});
