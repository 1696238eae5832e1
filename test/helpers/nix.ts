/**
 * The real Nix clients: Debian's nix-bin (2.8) on the host, and Nix 2.26 inside the trixie root made by
 * scripts/setup.sh (run through scripts/in-trixie.sh, whose mounts vanish with the command).
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { type RunOptions, type RunResult, run } from './exec.js';

export const REPO = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const SHARED = join(REPO, '..', 'shared');
export const TRIXIE_ROOT = process.env.BUILDBOX_TRIXIE_ROOT ?? '/var/cache/buildbox/trixie';

/** Environment for a single-user, offline Nix as root. */
export function nixEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return {
    PATH: process.env.PATH ?? '/usr/sbin:/usr/bin:/sbin:/bin',
    HOME: process.env.HOME ?? '/root',
    NIX_REMOTE: '',
    NIX_CONFIG: 'experimental-features = nix-command\nsubstituters =\nsandbox = false\nbuild-users-group =\n',
    ...extra,
  };
}

/** Run a Nix 2.8 command on the host. */
export function nix28(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run(cmd, args, { ...opts, env: nixEnv(opts.env) });
}

export function haveTrixie(): boolean {
  return existsSync(join(TRIXIE_ROOT, '.buildbox-ready'));
}

/**
 * Run a Nix 2.26 command inside the trixie root. `binds` are host directories made visible at the same path
 * inside (e.g. a temp dir holding keys and expressions).
 */
export function nix226(cmd: string, args: string[], opts: RunOptions & { binds?: string[] } = {}): Promise<RunResult> {
  const bindArgs = (opts.binds ?? []).flatMap((b) => ['--bind', b]);
  const env = nixEnv(opts.env);
  const envArgs = Object.entries(env).map(([k, v]) => `${k}=${v ?? ''}`);
  return run(
    'bash',
    [join(REPO, 'scripts', 'in-trixie.sh'), ...bindArgs, '--', 'env', '-i', ...envArgs, cmd, ...args],
    {
      ...opts,
      env: { ...process.env, BUILDBOX_TRIXIE_ROOT: TRIXIE_ROOT },
    },
  );
}

export type NixClient = typeof nix28;
export const CLIENTS: Array<{ name: string; version: string; run: NixClient }> = [
  { name: 'nix-2.8', version: '2.8', run: nix28 },
  { name: 'nix-2.26', version: '2.26', run: nix226 },
];
