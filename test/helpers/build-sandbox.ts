/** Fixtures for sandbox/build tests: a static busybox store object laid out on disk like the store does. */
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const BUSYBOX = '/bin/busybox';

/** A temp dir the build uids can traverse (mkdtemp makes 0700 dirs). */
export function openTempDir(prefix: string): { path: string; cleanup: () => void } {
  const path = mkdtempSync(join(tmpdir(), prefix));
  chmodSync(path, 0o755);
  return { path, cleanup: () => rmSync(path, { recursive: true, force: true }) };
}

/** Make `<dir>/bin/busybox` and `<dir>/bin/sh -> busybox`, world-readable like a store object. */
export function makeBusyboxTree(dir: string): void {
  mkdirSync(join(dir, 'bin'), { recursive: true });
  copyFileSync(BUSYBOX, join(dir, 'bin', 'busybox'));
  chmodSync(join(dir, 'bin', 'busybox'), 0o555);
  symlinkSync('busybox', join(dir, 'bin', 'sh'));
  chmodSync(join(dir, 'bin'), 0o555);
  chmodSync(dir, 0o555);
}
