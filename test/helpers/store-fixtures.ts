/**
 * Fixtures for the signing and store tests, made by the real Nix 2.8 on the host: store paths added with
 * `nix-store --add` / built with `nix-build`, their NARs from `nix-store --dump`, their path info from
 * `nix path-info --json`, and a check of signatures by `nix store verify` against a file:// binary cache.
 */
import { randomBytes } from 'node:crypto';
import { appendFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { runBuffer } from './exec.js';
import { nix28, nixEnv } from './nix.js';

export interface NixPathInfo {
  path: string;
  narHash: string;
  narSize: number;
  references: string[];
  deriver?: string;
  ca?: string;
  registrationTime?: number;
  ultimate?: boolean;
  signatures?: string[];
}

/** A token that makes every fixture of this test run distinct from other runs (and other helpers' tests). */
export function uniqueTag(): string {
  return randomBytes(6).toString('hex');
}

/** `nix-store --add <fsPath>`, returning the store path. */
export async function nixAdd(fsPath: string): Promise<string> {
  return (await nix28('nix-store', ['--add', fsPath])).stdout.trim();
}

/** Write a file (or a small tree) under `dir` and add it to the Nix store. */
export async function addFile(dir: string, name: string, contents: string | Buffer): Promise<string> {
  const sub = join(dir, `add-${uniqueTag()}`);
  mkdirSync(sub, { recursive: true });
  const p = join(sub, name);
  writeFileSync(p, contents);
  return nixAdd(p);
}

/**
 * Build an input-addressed (non-CA) output with `nix-build` whose contents mention `refs` (so they become its
 * references). Returns the output path.
 */
export async function buildWithRefs(dir: string, name: string, text: string, refs: string[] = []): Promise<string> {
  const expr = join(dir, `${name}-${uniqueTag()}.nix`);
  const refList = refs.map((r) => JSON.stringify(r)).join(' ');
  writeFileSync(
    expr,
    `derivation {
  name = ${JSON.stringify(name)};
  system = builtins.currentSystem;
  builder = "/bin/sh";
  refs = builtins.map (p: builtins.storePath p) [ ${refList} ];
  text = ${JSON.stringify(text)};
  args = [ "-c" "echo \\"$text $refs\\" > $out" ];
}
`,
  );
  const r = await nix28('nix-build', [expr, '--no-out-link']);
  return r.stdout.trim().split('\n').pop()!;
}

export async function nixPathInfo(path: string, sigs = false): Promise<NixPathInfo> {
  // `--derivation`: a .drv path means the derivation itself, not its outputs.
  const args = [
    'path-info',
    '--json',
    ...(sigs ? ['--sigs'] : []),
    ...(path.endsWith('.drv') ? ['--derivation'] : []),
    path,
  ];
  const r = await nix28('nix', args);
  const arr = JSON.parse(r.stdout) as NixPathInfo[];
  return arr[0]!;
}

/** The NAR of a path, from `nix-store --dump`. */
export function nixDump(path: string): Promise<Buffer> {
  return runBuffer('nix-store', ['--dump', path], nixEnv());
}

/**
 * Does Nix accept `sig` as a valid signature of `path` by `publicKey`? Copies the path into a file:// binary cache,
 * replaces the narinfo's signatures by `sig` and runs `nix store verify --sigs-needed 1` against that cache.
 */
export async function nixAcceptsSignature(dir: string, path: string, sig: string, publicKey: string): Promise<boolean> {
  const cache = join(dir, `cache-${uniqueTag()}`);
  await nix28('nix', ['copy', '--to', `file://${cache}`, path]);
  const hashPart = path.split('/').pop()!.slice(0, 32);
  const narinfo = join(cache, `${hashPart}.narinfo`);
  // `nix copy` to a cache does not copy signatures unless the source has some; strip any and add ours.
  const text = readFileSync(narinfo, 'utf8')
    .split('\n')
    .filter((l) => !l.startsWith('Sig:') && !l.startsWith('CA:'))
    .join('\n');
  writeFileSync(narinfo, text.endsWith('\n') ? text : `${text}\n`);
  appendFileSync(narinfo, `Sig: ${sig}\n`);
  const r = await nix28(
    'nix',
    [
      'store',
      'verify',
      '--store',
      `file://${cache}`,
      '--no-contents',
      '--trusted-public-keys',
      publicKey,
      '--sigs-needed',
      '1',
      path,
    ],
    { allowFail: true },
  );
  return r.code === 0;
}
