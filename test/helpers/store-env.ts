/** Helpers for store tests: NAR readers over buffers, path-info conversion from `nix path-info --json`, dir listings. */
import { existsSync, readdirSync } from 'node:fs';
import { Hash } from '../../src/hash.js';
import type { NewPathInfo } from '../../src/store.js';
import { WireReader } from '../../src/wire.js';
import type { NixPathInfo } from './store-fixtures.js';

/** A WireReader over `data`, delivered in chunks of `chunk` bytes; `cutAt` ends the stream early (broken connection). */
export function readerOf(data: Buffer, opts: { chunk?: number; cutAt?: number; delayMs?: number } = {}): WireReader {
  const chunk = opts.chunk ?? 4096;
  const end = opts.cutAt ?? data.length;
  async function* gen(): AsyncGenerator<Buffer> {
    for (let i = 0; i < end; i += chunk) {
      if (opts.delayMs) await new Promise((r) => setTimeout(r, opts.delayMs));
      yield data.subarray(i, Math.min(end, i + chunk));
    }
  }
  return new WireReader(gen());
}

/** A NewPathInfo from Nix's JSON path info. */
export function newInfoOf(j: NixPathInfo, extra: Partial<NewPathInfo> = {}): NewPathInfo {
  return {
    path: j.path,
    deriver: j.deriver ?? null,
    narHash: Hash.parseAnyPrefixed(j.narHash),
    narSize: j.narSize,
    references: [...j.references].sort(),
    registrationTime: j.registrationTime ?? 0,
    sigs: j.signatures ?? [],
    ca: j.ca ?? null,
    ...extra,
  };
}

export function listDir(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).sort() : [];
}

export async function collect(gen: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of gen) parts.push(c);
  return Buffer.concat(parts);
}
