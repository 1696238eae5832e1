/**
 * Test data for the copy workloads, made once per run in a client store (`local?root=<dir>`): the harness writes a
 * `nix-store --export` stream itself (spec §2.7: NAR + path + references per path) and pipes it into
 * `nix-store --import`, which is how to get input-addressed paths with arbitrary references into a store in a second
 * without building anything. Large contents are an AES-CTR key stream (incompressible, ~GB/s to make).
 */
import { createCipheriv, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import type { Writable } from 'node:stream';
import { lastLines, spawnTracked } from './proc.js';

const NIX32 = '0123456789abcdfghijklmnpqrsvwxyz';
const EXPORT_MAGIC = 0x4558494e;

export function randomHashPart(): string {
  const b = randomBytes(32);
  let s = '';
  for (let i = 0; i < 32; i++) s += NIX32[b[i]! & 31];
  return s;
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(n >>> 0, 0);
  b.writeUInt32LE(Math.floor(n / 0x1_0000_0000), 4);
  return b;
}

const pad8 = (n: number) => (8 - (n % 8)) % 8;

function str(s: string | Buffer): Buffer {
  const b = typeof s === 'string' ? Buffer.from(s, 'utf8') : s;
  return Buffer.concat([u64(b.length), b, Buffer.alloc(pad8(b.length))]);
}

/** NAR size of a single regular file of `len` bytes. */
export function narSizeOfFile(len: number): number {
  return 24 + 16 * 4 + 8 + len + pad8(len) + 16;
}

export interface GenPath {
  path: string;
  references: string[];
  /** File contents: either a buffer, or `size` bytes of key stream after `head`. */
  head: Buffer;
  size: number;
}

/** A source of incompressible bytes. */
class KeyStream {
  private readonly cipher = createCipheriv('aes-128-ctr', randomBytes(16), randomBytes(16));
  private readonly zeros = Buffer.alloc(1 << 20);
  next(n: number): Buffer {
    return this.cipher.update(n === this.zeros.length ? this.zeros : this.zeros.subarray(0, n));
  }
}

async function write(out: Writable, b: Buffer): Promise<void> {
  if (!out.write(b)) await once(out, 'drain');
}

/** Write the export stream of `paths` (dependencies first) into `nix-store --import` of the given store. */
export async function importPaths(store: string, paths: GenPath[], env: NodeJS.ProcessEnv): Promise<void> {
  const child = spawnTracked('nix-store', ['--store', store, '--import'], { env, stdio: ['pipe', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (d: string) => {
    if (stderr.length < 65536) stderr += d;
  });
  const done = new Promise<number>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (code) => resolve(code ?? 128));
  });
  const ks = new KeyStream();
  const stdin = child.stdin!;
  stdin.on('error', () => {});
  try {
    for (const p of paths) {
      const len = p.head.length + p.size;
      await write(
        stdin,
        Buffer.concat([
          u64(1),
          str('nix-archive-1'),
          str('('),
          str('type'),
          str('regular'),
          str('contents'),
          u64(len),
          p.head,
        ]),
      );
      let left = p.size;
      while (left > 0) {
        const n = Math.min(left, 1 << 20);
        await write(stdin, ks.next(n));
        left -= n;
      }
      await write(
        stdin,
        Buffer.concat([
          Buffer.alloc(pad8(len)),
          str(')'),
          u64(EXPORT_MAGIC),
          str(p.path),
          u64(p.references.length),
          ...p.references.map((r) => str(r)),
          str(''),
          u64(0),
        ]),
      );
    }
    await write(stdin, u64(0));
  } finally {
    stdin.end();
  }
  const code = await done;
  if (code !== 0) throw new Error(`nix-store --import into ${store} failed: ${lastLines(stderr, 5)}`);
}

export interface Closure {
  /** Paths to name on the command line (their closure is everything). */
  roots: string[];
  all: GenPath[];
  narBytes: number;
}

/** P1: `count` large paths of `totalBytes` in all, a chain (each refers to the one before); the root is the last. */
export function bigClosure(totalBytes: number, count: number, tag: string): Closure {
  const all: GenPath[] = [];
  let prev: string | null = null;
  const each = Math.floor(totalBytes / count);
  for (let i = 0; i < count; i++) {
    const path = `/nix/store/${randomHashPart()}-bench-big-${tag}-${i}`;
    const head = Buffer.from(prev ? `${prev}\n` : '\n');
    all.push({ path, references: prev ? [prev] : [], head, size: Math.max(0, each - head.length) });
    prev = path;
  }
  return { roots: [prev!], all, narBytes: all.reduce((s, p) => s + narSizeOfFile(p.head.length + p.size), 0) };
}

/** P2: `count` small paths of `size` bytes in chains of `chain` (each refers to the one before it in its chain). */
export function smallChains(count: number, chain: number, size: number, tag: string): Closure {
  const all: GenPath[] = [];
  const roots: string[] = [];
  const chains = Math.ceil(count / chain);
  let made = 0;
  for (let c = 0; c < chains; c++) {
    let prev: string | null = null;
    for (let i = 0; i < chain && made < count; i++, made++) {
      const path = `/nix/store/${randomHashPart()}-bench-small-${tag}-${c}-${i}`;
      let text = prev ? `${prev}\n` : '\n';
      // Printable filler, different in every file.
      const filler = randomBytes(Math.max(0, size - text.length)).toString('base64');
      text = (text + filler).slice(0, Math.max(size, text.length));
      all.push({ path, references: prev ? [prev] : [], head: Buffer.from(text), size: 0 });
      prev = path;
    }
    roots.push(prev!);
  }
  return { roots, all, narBytes: all.reduce((s, p) => s + narSizeOfFile(p.head.length), 0) };
}
