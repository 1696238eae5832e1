/** Starting a box: what it refuses before it makes anything (the build uid range must be its own). */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { buildUidConflict } from '../src/box.js';
import { tempDir } from './helpers/exec.js';

const t = tempDir('buildbox-box-');
afterAll(() => t.cleanup());

describe('buildUidConflict', () => {
  it('finds accounts of a passwd file and running processes in the range, and nothing in a free one', async () => {
    const passwd = join(t.path, 'passwd');
    writeFileSync(passwd, 'root:x:0:0::/root:/bin/sh\nbuildbot:x:30005:30005::/:/bin/false\n');
    expect(buildUidConflict(30000, 4, passwd)).toBeUndefined();
    expect(buildUidConflict(30000, 8, passwd)).toBe(`uid 30005 is the account 'buildbot' in ${passwd}`);
    const uid = 31377;
    const c = spawn('/bin/sleep', ['1000'], { uid, gid: uid, stdio: 'ignore' });
    await new Promise((res) => c.once('spawn', res));
    try {
      expect(buildUidConflict(uid - 2, 4, passwd)).toBe(
        `processes run as uid ${uid} (pid ${c.pid}): another buildbox with an overlapping range, or leftovers of a crashed one`,
      );
    } finally {
      c.kill('SIGKILL');
    }
    await new Promise((res) => c.once('exit', res));
    expect(buildUidConflict(uid - 2, 4, passwd)).toBeUndefined();
  });
});
