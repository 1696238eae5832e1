/**
 * The `buildbox` CLI compiled from the current sources with tsc (cached by a digest of src/), run by tests as a real
 * Node process — plain ESM, as users and sshd's forced command run it, not through the test transpiler.
 */
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { run } from './exec.js';
import { REPO } from './nix.js';

export async function compiledCli(): Promise<string> {
  const h = createHash('sha256');
  const srcDir = join(REPO, 'src');
  for (const f of (readdirSync(srcDir, { recursive: true }) as string[]).filter((x) => x.endsWith('.ts')).sort()) {
    h.update(f).update(readFileSync(join(srcDir, f)));
  }
  const dir = join(REPO, 'node_modules', '.cache', 'buildbox-test-cli', h.digest('hex').slice(0, 16));
  const cli = join(dir, 'src', 'cli.js');
  if (existsSync(cli)) return cli;
  const tmp = `${dir}.tmp-${process.pid}-${randomBytes(3).toString('hex')}`;
  const tsc = join(REPO, 'node_modules', 'typescript', 'bin', 'tsc');
  const r = await run(process.execPath, [tsc, '-p', join(REPO, 'tsconfig.build.json'), '--outDir', tmp], {
    allowFail: true,
    timeoutMs: 110_000,
  });
  if (!existsSync(join(tmp, 'src', 'cli.js'))) throw new Error(`tsc produced no cli.js:\n${r.stdout}${r.stderr}`);
  copyFileSync(join(REPO, 'package.json'), join(tmp, 'package.json'));
  try {
    renameSync(tmp, dir);
  } catch {
    rmSync(tmp, { recursive: true, force: true }); // another test file compiled the same sources first
  }
  return cli;
}
