/** Zero persistence (issue 3): the store is emptied at every start unless `persist`; the host key survives. */
import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBox, type TestBox } from './helpers/box.js';
import { nix28 } from './helpers/nix.js';

let tb: TestBox;
beforeAll(async () => {
  tb = await startTestBox({ users: ['alice'] });
});
afterAll(async () => {
  await tb?.stop();
});

async function upload(): Promise<string> {
  const store = `local?root=${tb.clientStore('restart')}`;
  const { stdout } = await tb.nix(nix28, 'nix-instantiate', [
    '--store',
    store,
    '--eval',
    '--read-write-mode',
    '-E',
    'builtins.toFile "keep-me" "data"',
  ]);
  const path = JSON.parse(stdout.trim()) as string;
  await tb.nix(nix28, 'nix', ['copy', '--from', store, '--to', 'ssh://alice@box', path]);
  return path;
}

const valid = async (path: string) =>
  (await tb.nix(nix28, 'nix', ['path-info', '--store', 'ssh://alice@box', path], { allowFail: true })).code === 0;
/** Objects the store holds (small ones live in its database), and entries under its objects/ directory. */
const objects = () => ({
  stored: tb.box.store.stats().objects,
  onDisk: readdirSync(join(tb.box.config.stateDir, 'store', 'objects')).length,
});

describe('restart', () => {
  it('wipes the store but keeps the host key; persist keeps the store', async () => {
    const fingerprint = tb.box.hostKey.fingerprint;
    const signing = tb.box.signingKey.publicKey.toString();
    const path = await upload();
    expect(await valid(path)).toBe(true);
    const logs = join(tb.box.config.stateDir, 'logs', 'alice');
    mkdirSync(logs, { recursive: true });
    writeFileSync(join(logs, 'x.drv.gz'), '');
    await tb.restart();
    expect(existsSync(logs)).toBe(false);
    expect(tb.box.hostKey.fingerprint).toBe(fingerprint);
    expect(tb.box.signingKey.publicKey.toString()).toBe(signing);
    expect(objects()).toEqual({ stored: 0, onDisk: 0 });
    expect(await valid(path)).toBe(false); // also proves the pinned host key still matches: ssh would refuse otherwise
    await upload();
    await tb.restart({ persist: true });
    expect(await valid(path)).toBe(true);
    expect(objects()).toEqual({ stored: 1, onDisk: 0 }); // a small object: kept in the database
  });
});
