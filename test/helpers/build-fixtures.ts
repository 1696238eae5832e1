/**
 * Fixtures for the build tests: derivations instantiated by the real Nix 2.8 on the host from expressions that use a
 * static busybox (like ../shared/examples/hello-box.nix), their inputs imported into a buildbox store, BasicDerivations
 * as a client sends them, and the same derivations realised by the real Nix (sandboxed) for comparison.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { BuildRequest, BuildResult } from '../../src/build.js';
import { type BasicDerivation, type Derivation, drvNameFromPath, parseDerivation } from '../../src/derivation.js';
import type { Store } from '../../src/store.js';
import { nix28 } from './nix.js';
import { newInfoOf, readerOf } from './store-env.js';
import { nixDump, nixPathInfo } from './store-fixtures.js';

/** The store path of the busybox tree `<dir>/bb` as `builtins.path { name = "busybox"; }` adds it. */
export const BB_LET = 'let bb = builtins.path { path = ./bb; name = "busybox"; }; in';

export interface Instantiated {
  drvPath: string;
  drv: Derivation;
}

/** Write `<dir>/<file>.nix` with `body` (which may use `bb`) and instantiate it with Nix 2.8. */
export async function instantiate(dir: string, file: string, body: string): Promise<Instantiated> {
  const p = join(dir, `${file}.nix`);
  writeFileSync(p, `${BB_LET}\n${body}\n`);
  const r = await nix28('nix-instantiate', [p]);
  const drvPath = r.stdout.trim().split('\n').pop()!;
  return { drvPath, drv: readDrv(drvPath) };
}

export function readDrv(drvPath: string): Derivation {
  return parseDerivation(readFileSync(drvPath, 'latin1'), drvNameFromPath(drvPath));
}

/** Import a path of the host Nix store (with `nix-store --dump` and its path info) into `user`'s view. */
export async function importFromHost(store: Store, user: string, path: string): Promise<void> {
  if (store.isValidPath(user, path)) return;
  const info = await nixPathInfo(path);
  for (const r of info.references) if (r !== path) await importFromHost(store, user, r);
  await store.addToStoreNar(user, newInfoOf(info), readerOf(await nixDump(path)));
}

/**
 * The BasicDerivation a client sends for `d`: its input sources plus the wanted outputs of its input derivations,
 * closed under references in `user`'s view of `store` (those outputs must be valid there).
 */
export function basicOf(store: Store, user: string, d: Instantiated): BasicDerivation {
  const inputs = new Set(d.drv.inputSrcs);
  for (const [drvPath, outs] of d.drv.inputDrvs) {
    const input = readDrv(drvPath);
    for (const o of outs) inputs.add(input.outputs.get(o)!.path);
  }
  const { name, outputs, platform, builder, args, env } = d.drv;
  return { name, outputs, inputSrcs: store.queryClosure(user, inputs), platform, builder, args, env };
}

/** Realise `drvPath` with the real Nix 2.8, sandboxed; returns the output paths by name. */
export async function nixRealise(drvPath: string): Promise<Map<string, string>> {
  await nix28('nix-store', ['--realise', drvPath, '--option', 'sandbox', 'true']);
  const drv = readDrv(drvPath);
  return new Map([...drv.outputs].map(([n, o]) => [n, o.path]));
}

/** A request with recorders for its log and notices. */
export interface Recorded {
  req: BuildRequest;
  logs: Buffer[];
  notices: string[];
  ctrl: AbortController;
  /** When the first log chunk arrived (ms since epoch), if any. */
  firstLogAt?: number;
  log(): string;
}

export function request(
  user: string,
  drvPath: string,
  drv: BasicDerivation,
  opts: Partial<Pick<BuildRequest, 'verified' | 'options'>> = {},
): Recorded {
  const ctrl = new AbortController();
  const rec: Recorded = {
    logs: [],
    notices: [],
    ctrl,
    log: () => Buffer.concat(rec.logs).toString('latin1'),
    req: {
      user,
      drvPath,
      drv,
      verified: opts.verified ?? false,
      options: opts.options ?? { maxSilentTime: 0, buildTimeout: 0, maxLogSize: 0 },
      log: (chunk) => {
        rec.firstLogAt ??= Date.now();
        rec.logs.push(Buffer.from(chunk));
      },
      notice: (msg) => rec.notices.push(msg),
      signal: ctrl.signal,
    },
  };
  return rec;
}

export function describeResult(r: BuildResult): string {
  return `status ${r.status}: ${r.errorMsg}`;
}
