/**
 * Small-path import micro-benchmark: `Store.addToStoreNar` of many small NARs (one regular file each, in reference
 * chains), straight from memory, with no SSH and no client: the box's own cost per small path (bench P2 without the
 * transport). Reports wall time and process CPU (all threads) per path, for one-path-at-a-time imports (`single`),
 * batched ones (`batch`, like `ssh-ng://` AddMultipleToStore) and whole serve-protocol sessions over in-memory
 * streams, one AddToStoreNar command and reply at a time (`serve`, like `ssh://`).
 *
 * Run: `node --expose-gc dist/bench/store.js [--paths N] [--size BYTES] [--chain N] [--repeat N] [--dir DIR]
 * [--modes single,batch,serve]`.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { parseArgs } from 'node:util';
import { Hash } from '../src/hash.js';
import { silentLogger } from '../src/logger.js';
import * as nix32 from '../src/nix32.js';
import { runServe } from '../src/serve-protocol.js';
import type { Session } from '../src/session.js';
import { type NewPathInfo, Store } from '../src/store.js';
import { WireReader, WireWriter } from '../src/wire.js';

function token(b: Buffer | string): Buffer {
  const d = typeof b === 'string' ? Buffer.from(b, 'latin1') : b;
  const out = Buffer.alloc(8 + d.length + ((8 - (d.length % 8)) % 8));
  out.writeUInt32LE(d.length, 0);
  d.copy(out, 8);
  return out;
}

/** The NAR of a single regular file. */
function fileNar(contents: Buffer): Buffer {
  return Buffer.concat([
    token('nix-archive-1'),
    token('('),
    token('type'),
    token('regular'),
    token('contents'),
    token(contents),
    token(')'),
  ]);
}

interface Item {
  info: NewPathInfo;
  nar: Buffer;
}

function makeItems(n: number, size: number, chain: number): Item[] {
  const items: Item[] = [];
  for (let i = 0; i < n; i++) {
    const nar = fileNar(randomBytes(size));
    const hashPart = nix32.encode(randomBytes(20));
    const path = `/nix/store/${hashPart}-small-${i}`;
    const refs = i % chain === 0 ? [] : [items[i - 1]!.info.path];
    items.push({
      nar,
      info: {
        path,
        deriver: null,
        narHash: new Hash('sha256', createHash('sha256').update(nar).digest()),
        narSize: nar.length,
        references: refs,
        sigs: [],
        ca: null,
      },
    });
  }
  return items;
}

async function* once(b: Buffer): AsyncGenerator<Buffer> {
  yield b;
}

async function* all(items: Item[]): AsyncGenerator<Buffer> {
  for (const it of items) yield it.nar;
}

interface Run {
  mode: string;
  wallMs: number;
  cpuMs: number;
  usPerPath: number;
  cpuUsPerPath: number;
}

/** A serve-protocol session over in-memory streams, driven like Nix's legacy client: one command, then its reply. */
async function serveUploads(items: Item[], user: string, store: Store): Promise<void> {
  const input = new PassThrough();
  const output = new PassThrough();
  const session: Session = {
    id: `bench-${user}`,
    user,
    store,
    builder: {} as never,
    logger: silentLogger(),
    signal: new AbortController().signal,
  };
  const done = runServe(session, { input, output, stderr: new PassThrough() }, { write: true });
  const w = new WireWriter(input);
  const r = new WireReader(output);
  w.u64(0x390c9deb).u64(0x207);
  await w.flush();
  await r.readU64();
  await r.readU64();
  for (const it of items) {
    const i = it.info;
    w.u64(9).string(i.path).string('').string(i.narHash.toBase16()).strings(i.references).u64(0);
    w.u64(i.narSize).u64(0).strings([]).string('').raw(it.nar);
    await w.flush();
    if ((await r.readU64()) !== 1) throw new Error('upload refused');
  }
  input.end();
  await done;
}

async function runOnce(items: Item[], mode: 'single' | 'batch' | 'serve', user: string, store: Store): Promise<Run> {
  globalThis.gc?.();
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  if (mode === 'serve') {
    await serveUploads(items, user, store);
  } else if (mode === 'single') {
    for (const it of items) await store.addToStoreNar(user, it.info, new WireReader(once(it.nar)), { holder: user });
  } else {
    const r = new WireReader(all(items));
    const batch = new Set<string>();
    for (const it of items) {
      await store.addToStoreNar(user, it.info, r, { batch, holder: user });
      batch.add(it.info.path);
    }
  }
  store.releaseTempRoots(user);
  const wallMs = performance.now() - t0;
  const c = process.cpuUsage(c0);
  const cpuMs = (c.user + c.system) / 1000;
  return {
    mode,
    wallMs,
    cpuMs,
    usPerPath: (wallMs * 1000) / items.length,
    cpuUsPerPath: (cpuMs * 1000) / items.length,
  };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      paths: { type: 'string', default: '2000' },
      size: { type: 'string', default: '4096' },
      chain: { type: 'string', default: '20' },
      repeat: { type: 'string', default: '5' },
      dir: { type: 'string' },
      modes: { type: 'string', default: 'single,batch,serve' },
    },
  });
  const n = Number(values.paths);
  const size = Number(values.size);
  const chain = Number(values.chain);
  const repeat = Number(values.repeat);
  const modes = values.modes.split(',') as Array<'single' | 'batch' | 'serve'>;
  const dir = mkdtempSync(join(values.dir ?? tmpdir(), 'buildbox-store-bench-'));
  const store = Store.open({ stateDir: dir, persist: false, trustedPublicKeys: [] });
  try {
    let u = 0;
    const results: Run[] = [];
    for (let rep = 0; rep < repeat; rep++) {
      for (const mode of modes) {
        const items = makeItems(n, size, chain);
        const r = await runOnce(items, mode, `bench${++u}`, store);
        results.push(r);
        process.stdout.write(
          `${mode.padEnd(6)} ${n} × ${size} B: ${r.wallMs.toFixed(0)} ms wall (${r.usPerPath.toFixed(0)} µs/path), ` +
            `${r.cpuMs.toFixed(0)} ms CPU (${r.cpuUsPerPath.toFixed(0)} µs/path)\n`,
        );
      }
    }
    for (const mode of modes) {
      const rs = results.filter((r) => r.mode === mode).sort((a, b) => a.cpuUsPerPath - b.cpuUsPerPath);
      const med = rs[Math.floor(rs.length / 2)]!;
      process.stdout.write(
        `median ${mode}: ${med.usPerPath.toFixed(0)} µs/path wall, ${med.cpuUsPerPath.toFixed(0)} µs/path CPU\n`,
      );
    }
  } finally {
    store.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
