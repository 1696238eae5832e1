/**
 * NAR (Nix ARchive, spec §4): a streaming writer (`dumpPath`), a streaming reader that extracts atomically
 * (`restoreNar`) and a validating parser that only hashes (`parseNar`).
 *
 * Both directions are canonical: the writer produces exactly what `nix-store --dump` produces, and the reader accepts
 * only that form (sorted unique names, `executable` before `contents`, zero padding, no optional fields). A NAR that
 * `restoreNar` accepts therefore re-dumps to the same bytes, so its NAR hash really describes the extracted tree.
 *
 * Names and symlink targets are arbitrary bytes: they are handled as Buffers (never decoded), and file system paths
 * below the top-level node are Buffers too, so non-UTF-8 names round-trip exactly.
 */
import { createHash, type Hash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { WireError, type WireReader } from './wire.js';

/** A malformed or over-limit NAR. `offset` is the byte offset inside the NAR (0 = first byte of the magic). */
export class NarError extends WireError {
  constructor(message: string, offset?: number) {
    super(message, offset);
    this.name = 'NarError';
  }
}

/** A tree that cannot be represented as a NAR (socket, device…), or that changed while it was being dumped. */
export class NarDumpError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'NarDumpError';
  }
}

/** Writing an extracted tree failed (disk full, a name the file system refuses…); `code` is the errno code. */
export class NarRestoreError extends Error {
  readonly code: string | undefined;
  constructor(dest: string, tmp: string, cause: unknown) {
    const e = cause as NodeJS.ErrnoException;
    const detail = (e instanceof Error ? e.message : String(e)).split(tmp).join(dest);
    super(`cannot extract the NAR to ${dest}: ${detail}`, { cause });
    this.name = 'NarRestoreError';
    this.code = e?.code;
  }
}

export interface NarSummary {
  /** sha256 digest (32 bytes) of the exact NAR bytes. */
  narHash: Buffer;
  narSize: number;
}

/** Streaming sha256 + size over NAR bytes; small updates are coalesced to keep the per-call overhead down. */
export class NarHasher {
  private readonly h: Hash = createHash('sha256');
  size = 0;

  update(b: Buffer): void {
    this.h.update(b);
    this.size += b.length;
  }

  digest(): NarSummary {
    return { narHash: this.h.digest(), narSize: this.size };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------------------------

function padLen(n: number): number {
  return (8 - (n % 8)) % 8;
}

function tokenBytes(s: string): Buffer {
  const data = Buffer.from(s, 'latin1');
  const out = Buffer.alloc(8 + data.length + padLen(data.length));
  out.writeUInt32LE(data.length, 0);
  data.copy(out, 8);
  return out;
}

const T_MAGIC = tokenBytes('nix-archive-1');
const T_OPEN = tokenBytes('(');
const T_CLOSE = tokenBytes(')');
const T_TYPE = tokenBytes('type');
const T_REGULAR = tokenBytes('regular');
const T_EXECUTABLE = tokenBytes('executable');
const T_EMPTY = tokenBytes('');
const T_CONTENTS = tokenBytes('contents');
const T_SYMLINK = tokenBytes('symlink');
const T_TARGET = tokenBytes('target');
const T_DIRECTORY = tokenBytes('directory');
const T_ENTRY = tokenBytes('entry');
const T_NAME = tokenBytes('name');
const T_NODE = tokenBytes('node');

/** `( type regular contents` / `( type regular executable "" contents` (the length of the contents follows). */
const H_REGULAR = Buffer.concat([T_OPEN, T_TYPE, T_REGULAR, T_CONTENTS]);
const H_EXECUTABLE = Buffer.concat([T_OPEN, T_TYPE, T_REGULAR, T_EXECUTABLE, T_EMPTY, T_CONTENTS]);
const H_SYMLINK = Buffer.concat([T_OPEN, T_TYPE, T_SYMLINK, T_TARGET]);
const H_DIRECTORY = Buffer.concat([T_OPEN, T_TYPE, T_DIRECTORY]);
const H_ENTRY = Buffer.concat([T_ENTRY, T_OPEN, T_NAME]);
const ZEROS = Buffer.alloc(8);
const SLASH = Buffer.from('/');

function joinPath(dir: Buffer, name: Buffer): Buffer {
  return Buffer.concat([dir, SLASH, name], dir.length + 1 + name.length);
}

/** Bytes as a short readable string for messages: printable ASCII as is, anything else as \xNN. */
export function showBytes(b: Buffer, max = 64): string {
  let s = '';
  const n = Math.min(b.length, max);
  for (let i = 0; i < n; i++) {
    const c = b[i]!;
    if (c >= 0x20 && c < 0x7f && c !== 0x22 && c !== 0x5c) s += String.fromCharCode(c);
    else s += `\\x${c.toString(16).padStart(2, '0')}`;
  }
  return `"${s}${b.length > max ? '…' : ''}"`;
}

function showPath(p: Buffer | string): string {
  return typeof p === 'string' ? p : p.toString('utf8');
}

// ---------------------------------------------------------------------------------------------------------------
// Promisified callback fs (cheaper than fs.promises' FileHandle machinery on hot paths)
// ---------------------------------------------------------------------------------------------------------------

type PathLike = string | Buffer;

function pOpen(path: PathLike, flags: number, mode?: number): Promise<number> {
  return new Promise((res, rej) => fs.open(path, flags, mode, (e, fd) => (e ? rej(e) : res(fd))));
}
function pClose(fd: number): Promise<void> {
  return new Promise((res, rej) => fs.close(fd, (e) => (e ? rej(e) : res())));
}
function pFstat(fd: number): Promise<fs.Stats> {
  return new Promise((res, rej) => fs.fstat(fd, (e, st) => (e ? rej(e) : res(st))));
}
function pRead(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((res, rej) => fs.read(fd, buf, off, len, pos, (e, n) => (e ? rej(e) : res(n))));
}
function pWrite(fd: number, buf: Buffer, off: number, len: number): Promise<number> {
  return new Promise((res, rej) => fs.write(fd, buf, off, len, null, (e, n) => (e ? rej(e) : res(n))));
}
async function pWriteAll(fd: number, buf: Buffer): Promise<void> {
  let off = 0;
  while (off < buf.length) off += await pWrite(fd, buf, off, buf.length - off);
}
function pFchmod(fd: number, mode: number): Promise<void> {
  return new Promise((res, rej) => fs.fchmod(fd, mode, (e) => (e ? rej(e) : res())));
}
function pFutimes(fd: number, t: number): Promise<void> {
  return new Promise((res, rej) => fs.futimes(fd, t, t, (e) => (e ? rej(e) : res())));
}
function pMkdir(path: PathLike, mode: number): Promise<void> {
  return new Promise((res, rej) => fs.mkdir(path, { mode }, (e) => (e ? rej(e) : res())));
}
function pSymlink(target: Buffer, path: PathLike): Promise<void> {
  return new Promise((res, rej) => fs.symlink(target, path, (e) => (e ? rej(e) : res())));
}
function pLutimes(path: PathLike, t: number): Promise<void> {
  return new Promise((res, rej) => fs.lutimes(path, t, t, (e) => (e ? rej(e) : res())));
}
function pLstat(path: PathLike): Promise<fs.Stats> {
  return new Promise((res, rej) => fs.lstat(path, (e, st) => (e ? rej(e) : res(st))));
}
function pReadlink(path: PathLike): Promise<Buffer> {
  return new Promise((res, rej) =>
    fs.readlink(path, { encoding: 'buffer' }, (e, t) => (e ? rej(e) : res(t as unknown as Buffer))),
  );
}
function pReaddir(path: PathLike): Promise<fs.Dirent<Buffer>[]> {
  return new Promise((res, rej) =>
    fs.readdir(path, { encoding: 'buffer', withFileTypes: true }, (e, d) => (e ? rej(e) : res(d))),
  );
}

// ---------------------------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------------------------

export interface DumpOptions {
  /** Called with every chunk, in order, before it is yielded (e.g. a `NarHasher` or a reference scanner). */
  onChunk?: (b: Buffer) => void;
  /** Read size for large files (default 1 MiB). */
  chunkSize?: number;
}

/** Files up to this size are read whole (and prefetched); bigger ones are streamed in `chunkSize` reads. */
const SMALL_FILE = 256 * 1024;
/** Tokens and small file contents are batched into buffers of about this size before being yielded. */
const BATCH = 256 * 1024;
/** Prefetch limits: files ahead in the current directory, and bytes held by prefetched small files. */
const PREFETCH_FILES = 16;
const PREFETCH_BYTES = 8 * 1024 * 1024;

const O_READ = fs.constants.O_RDONLY | fs.constants.O_NOFOLLOW | fs.constants.O_NONBLOCK;
const S_IXUSR = 0o100;

/** A regular file opened (without following symlinks) and, if small, already read. */
interface OpenedFile {
  fd: number;
  size: number;
  executable: boolean;
  /** The whole contents for small files (fd already closed then: fd = -1). */
  data?: Buffer;
}

function fileTypeName(st: fs.Stats | fs.Dirent<Buffer>): string {
  if (st.isSocket()) return 'a socket';
  if (st.isFIFO()) return 'a named pipe';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  return 'of an unknown file type';
}

function unsupported(path: Buffer | string, st: fs.Stats | fs.Dirent<Buffer>): NarDumpError {
  return new NarDumpError(
    `cannot put ${showPath(path)} in a NAR: it is ${fileTypeName(st)} (only regular files, symlinks and directories can be)`,
  );
}

async function openFile(path: Buffer, smallMax: number): Promise<OpenedFile> {
  let fd: number;
  try {
    fd = await pOpen(path, O_READ);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ELOOP') {
      throw new NarDumpError(`cannot dump ${showPath(path)}: it became a symlink while being dumped`);
    }
    throw e;
  }
  try {
    const st = await pFstat(fd);
    if (!st.isFile()) throw new NarDumpError(`cannot dump ${showPath(path)}: it changed type while being dumped`);
    const size = st.size;
    const executable = (st.mode & S_IXUSR) !== 0;
    if (size > smallMax) return { fd, size, executable };
    const data = Buffer.allocUnsafe(size);
    let got = 0;
    while (got < size) {
      const n = await pRead(fd, data, got, size - got, got);
      if (n === 0) throw new NarDumpError(`cannot dump ${showPath(path)}: the file shrank while being dumped`);
      got += n;
    }
    await pClose(fd);
    return { fd: -1, size, executable, data };
  } catch (e) {
    fs.close(fd, () => {});
    throw e;
  }
}

/** Tokens and small payloads are appended here; `take()` hands them out as one buffer. */
class Batch {
  buf = Buffer.allocUnsafe(BATCH);
  len = 0;
  /** Full buffers not yet handed out (only when a single token is bigger than the room left). */
  full: Buffer[] = [];

  private room(n: number): void {
    if (this.len + n <= this.buf.length) return;
    if (this.len > 0) this.full.push(this.buf.subarray(0, this.len));
    this.buf = Buffer.allocUnsafe(Math.max(BATCH, n));
    this.len = 0;
  }

  raw(b: Buffer): void {
    this.room(b.length);
    b.copy(this.buf, this.len);
    this.len += b.length;
  }

  u64(v: number): void {
    this.room(8);
    this.buf.writeUInt32LE(v % 0x1_0000_0000, this.len);
    this.buf.writeUInt32LE(Math.floor(v / 0x1_0000_0000), this.len + 4);
    this.len += 8;
  }

  pad(n: number): void {
    const p = padLen(n);
    if (p > 0) this.raw(ZEROS.subarray(0, p));
  }

  /** A length-prefixed, zero-padded string. */
  str(b: Buffer): void {
    const total = 8 + b.length + padLen(b.length);
    this.room(total);
    this.u64(b.length);
    b.copy(this.buf, this.len);
    this.len += b.length;
    this.pad(b.length);
  }

  get size(): number {
    return this.len + this.full.reduce((a, b) => a + b.length, 0);
  }

  take(): Buffer[] {
    const out = this.full;
    if (this.len > 0) out.push(this.buf.subarray(0, this.len));
    this.full = [];
    this.buf = Buffer.allocUnsafe(BATCH);
    this.len = 0;
    return out;
  }
}

interface DirFrame {
  path: Buffer;
  entries: fs.Dirent<Buffer>[];
  /** Next entry to emit. */
  i: number;
  /** Prefetched regular files, by entry index. */
  pre: Map<number, Promise<OpenedFile>>;
  /** Entries up to here have been considered for prefetching. */
  preNext: number;
}

/**
 * Serialise the file system object at `fsPath` (not following a top-level symlink) as a NAR, in chunks. Directory
 * entries are sorted bytewise; file contents are read in large chunks and never held whole; tokens and small files
 * are batched. Sockets, devices and FIFOs are refused with an error naming the path.
 */
export async function* dumpPath(fsPath: string | Buffer, opts: DumpOptions = {}): AsyncGenerator<Buffer> {
  const chunkSize = opts.chunkSize ?? 1024 * 1024;
  const onChunk = opts.onChunk;
  const out = new Batch();
  const stack: DirFrame[] = [];
  const root = typeof fsPath === 'string' ? Buffer.from(fsPath) : fsPath;
  /** Bytes held by prefetched small files not yet emitted. */
  let preBytes = 0;

  const prefetch = (f: DirFrame): void => {
    while (f.preNext < f.entries.length && f.preNext < f.i + PREFETCH_FILES && preBytes < PREFETCH_BYTES) {
      const k = f.preNext++;
      const d = f.entries[k]!;
      if (!d.isFile()) continue;
      const p = openFile(joinPath(f.path, d.name), SMALL_FILE).then((o) => {
        preBytes += o.data?.length ?? 0;
        return o;
      });
      // Errors surface when the entry is reached; until then keep them from being reported as unhandled.
      p.catch(() => {});
      f.pre.set(k, p);
    }
  };

  try {
    const topSt = await pLstat(root);
    out.raw(T_MAGIC);
    /** The next node to emit: its path and, for entries, its dirent (for the root, its lstat). */
    let node: { path: Buffer; kind: fs.Stats | fs.Dirent<Buffer>; file?: Promise<OpenedFile> } | null = {
      path: root,
      kind: topSt,
    };
    while (node !== null) {
      const { path, kind } = node;
      if (kind.isFile()) {
        const f = await (node.file ?? openFile(path, SMALL_FILE));
        if (f.data) preBytes -= node.file ? f.data.length : 0;
        out.raw(f.executable ? H_EXECUTABLE : H_REGULAR);
        out.u64(f.size);
        if (f.data) {
          if (f.data.length <= 64 * 1024) out.raw(f.data);
          else {
            for (const b of out.take()) {
              onChunk?.(b);
              yield b;
            }
            onChunk?.(f.data);
            yield f.data;
          }
        } else {
          for (const b of out.take()) {
            onChunk?.(b);
            yield b;
          }
          yield* streamFile(path, f, chunkSize, onChunk);
        }
        out.pad(f.size);
        out.raw(T_CLOSE);
        if (stack.length > 0) out.raw(T_CLOSE);
      } else if (kind.isSymbolicLink()) {
        const target = await pReadlink(path);
        out.raw(H_SYMLINK);
        out.str(target);
        out.raw(T_CLOSE);
        if (stack.length > 0) out.raw(T_CLOSE);
      } else if (kind.isDirectory()) {
        const entries = await pReaddir(path);
        entries.sort((a, b) => Buffer.compare(a.name, b.name));
        out.raw(H_DIRECTORY);
        stack.push({ path, entries, i: 0, pre: new Map(), preNext: 0 });
      } else {
        throw unsupported(path, kind);
      }

      if (out.len >= BATCH - 4096 || out.full.length > 0) {
        for (const b of out.take()) {
          onChunk?.(b);
          yield b;
        }
      }

      // Find the next node: the next entry of the innermost unfinished directory.
      node = null;
      while (stack.length > 0) {
        const f = stack[stack.length - 1]!;
        if (f.i < f.entries.length) {
          const k = f.i++;
          const d = f.entries[k]!;
          prefetch(f);
          out.raw(H_ENTRY);
          out.str(d.name);
          out.raw(T_NODE);
          const file = f.pre.get(k);
          if (file) f.pre.delete(k);
          node = { path: joinPath(f.path, d.name), kind: d, ...(file ? { file } : {}) };
          break;
        }
        out.raw(T_CLOSE); // end of the directory node
        stack.pop();
        if (stack.length > 0) out.raw(T_CLOSE); // end of the entry holding it
      }
    }
    for (const b of out.take()) {
      onChunk?.(b);
      yield b;
    }
  } finally {
    // Close whatever prefetched large files were never reached (error or consumer stopped early).
    for (const f of stack) {
      for (const p of f.pre.values()) {
        p.then(
          (o) => {
            if (o.fd >= 0) fs.close(o.fd, () => {});
          },
          () => {},
        );
      }
    }
  }
}

async function* streamFile(
  path: Buffer,
  f: OpenedFile,
  chunkSize: number,
  onChunk: ((b: Buffer) => void) | undefined,
): AsyncGenerator<Buffer> {
  const { fd, size } = f;
  let pos = 0;
  const readAt = async (at: number): Promise<Buffer> => {
    const want = Math.min(chunkSize, size - at);
    const b = Buffer.allocUnsafe(want);
    let got = 0;
    while (got < want) {
      const n = await pRead(fd, b, got, want - got, at + got);
      if (n === 0) throw new NarDumpError(`cannot dump ${showPath(path)}: the file shrank while being dumped`);
      got += n;
    }
    return b;
  };
  let next: Promise<Buffer> | null = null;
  try {
    next = size > 0 ? readAt(0) : null;
    while (next !== null) {
      const cur: Buffer = await next;
      pos += cur.length;
      // Read ahead while the consumer hashes / sends this chunk.
      next = pos < size ? readAt(pos) : null;
      onChunk?.(cur);
      yield cur;
    }
  } finally {
    if (next) await next.catch(() => {});
    await pClose(fd).catch(() => {});
  }
}

/** NAR hash (sha256) and size of the object at `fsPath`, without keeping the NAR. */
export async function narHashPath(fsPath: string | Buffer): Promise<NarSummary> {
  const h = new NarHasher();
  for await (const c of dumpPath(fsPath)) h.update(c);
  return h.digest();
}

/** The whole NAR of `fsPath` in memory — for tests and small objects only. */
export async function dumpPathToBuffer(fsPath: string | Buffer): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of dumpPath(fsPath)) parts.push(c);
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------------------------------------------
// Reader
// ---------------------------------------------------------------------------------------------------------------

export interface NarReadOptions {
  /** Largest acceptable NAR in bytes (default: no limit below 2^53). */
  maxSize?: number;
  /** Largest acceptable regular file (default: only `maxSize`). */
  maxFileSize?: number;
  /** Longest directory entry name (default 255, Linux NAME_MAX). */
  maxNameLength?: number;
  /** Longest symlink target (default 4095, Linux PATH_MAX - 1). */
  maxTargetLength?: number;
  /** Deepest directory nesting (default 512; the top-level node is depth 0). */
  maxDepth?: number;
  /** Require the source to end right after the NAR. */
  expectEnd?: boolean;
  /** Called with the exact NAR bytes, in order, as they are consumed (the buffers are not reused). */
  onChunk?: (b: Buffer) => void;
  /** Stop (and clean up) when aborted. */
  signal?: AbortSignal;
}

export interface RestoreOptions extends NarReadOptions {
  /**
   * After an extraction (I/O) error, keep parsing the NAR to its end before throwing, so the stream stays in sync
   * for the next message. Parse errors and aborts always stop at once.
   */
  drainOnIoError?: boolean;
}

interface Limits {
  maxSize: number;
  maxFileSize: number;
  maxNameLength: number;
  maxTargetLength: number;
  maxDepth: number;
}

function limitsOf(o: NarReadOptions): Limits {
  return {
    maxSize: o.maxSize ?? Number.MAX_SAFE_INTEGER,
    maxFileSize: o.maxFileSize ?? Number.MAX_SAFE_INTEGER,
    maxNameLength: o.maxNameLength ?? 255,
    maxTargetLength: o.maxTargetLength ?? 4095,
    maxDepth: o.maxDepth ?? 512,
  };
}

/** Largest keyword token ("nix-archive-1"); anything longer cannot be the expected keyword. */
const MAX_KEYWORD = 16;
/** Small reads are copied into a staging buffer so that the hash sees few, large updates. */
const STAGE = 64 * 1024;
/** Content reads are at most this big. */
const READ_CHUNK = 1024 * 1024;

function isEof(e: unknown): boolean {
  return e instanceof WireError && !(e instanceof NarError) && e.message.startsWith('unexpected end of stream');
}

/** Creates the tree; every operation on a file is chained, different files are written concurrently. */
class Extractor {
  /** Directories created, in creation order (parents first). */
  readonly dirs: Buffer[] = [];
  private inflightBytes = 0;
  private inflightFiles = 0;
  private readonly waiters: Array<() => void> = [];
  private readonly all = new Set<Promise<void>>();
  error: unknown = undefined;

  readonly root: Buffer;

  constructor(
    readonly dest: string,
    readonly tmp: string,
    private readonly maxBytes = 32 * 1024 * 1024,
    private readonly maxFiles = 64,
  ) {
    this.root = Buffer.from(tmp);
  }

  wrap(e: unknown): NarRestoreError {
    return e instanceof NarRestoreError ? e : new NarRestoreError(this.dest, this.tmp, e);
  }

  private fail(e: unknown): void {
    this.error ??= this.wrap(e);
    this.wake();
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  private track(p: Promise<void>): void {
    const q = p.then(
      () => {},
      (e) => this.fail(e),
    );
    this.all.add(q);
    void q.finally(() => this.all.delete(q));
  }

  /** Wait while too much is being written; the parser calls this between steps. */
  async room(): Promise<void> {
    while (this.error === undefined && (this.inflightBytes > this.maxBytes || this.inflightFiles > this.maxFiles)) {
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }

  async mkdir(path: Buffer): Promise<void> {
    try {
      await pMkdir(path, 0o700);
    } catch (e) {
      throw this.wrap(e);
    }
    this.dirs.push(path);
  }

  symlink(path: Buffer, target: Buffer): void {
    this.track(pSymlink(target, path).then(() => pLutimes(path, 1)));
  }

  file(path: Buffer): FileOut {
    return new FileOut(this, path);
  }

  /** @internal */ startFile(): void {
    this.inflightFiles++;
  }
  /** @internal */ endFile(p: Promise<void>): void {
    this.track(
      p.finally(() => {
        this.inflightFiles--;
        this.wake();
      }),
    );
  }
  /** @internal */ addBytes(n: number): void {
    this.inflightBytes += n;
  }
  /** @internal */ subBytes(n: number): void {
    this.inflightBytes -= n;
    this.wake();
  }

  /** Wait for every started operation. */
  async settle(): Promise<void> {
    while (this.all.size > 0) await Promise.allSettled([...this.all]);
  }

  /** Canonical store permissions and times for directories, once everything inside exists. */
  async finishDirs(): Promise<void> {
    for (let i = this.dirs.length - 1; i >= 0; i--) {
      const d = this.dirs[i]!;
      await new Promise<void>((res, rej) => fs.chmod(d, 0o555, (e) => (e ? rej(e) : res())));
      await new Promise<void>((res, rej) => fs.utimes(d, 1, 1, (e) => (e ? rej(e) : res())));
    }
  }

  /** Remove everything created (directories made writable first). */
  async removeAll(): Promise<void> {
    await this.settle();
    for (const d of this.dirs) await new Promise<void>((res) => fs.chmod(d, 0o700, () => res()));
    await fs.promises.rm(this.root, { recursive: true, force: true });
  }
}

const O_CREATE = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW;

class FileOut {
  private fd = -1;
  private chain: Promise<void>;

  constructor(
    private readonly ex: Extractor,
    readonly path: Buffer,
  ) {
    ex.startFile();
    this.chain = pOpen(path, O_CREATE, 0o600).then((fd) => {
      this.fd = fd;
    });
  }

  write(b: Buffer): void {
    const ex = this.ex;
    ex.addBytes(b.length);
    this.chain = this.chain
      .then(() => pWriteAll(this.fd, b))
      .finally(() => {
        ex.subBytes(b.length);
      });
  }

  end(executable: boolean): void {
    const p = this.chain
      .then(() => pFchmod(this.fd, executable ? 0o555 : 0o444))
      .then(() => pFutimes(this.fd, 1))
      .finally(() => (this.fd >= 0 ? pClose(this.fd) : undefined));
    this.ex.endFile(p);
  }
}

/** Reads and checks one NAR from a WireReader, hashing the exact bytes and optionally extracting it. */
class NarParser {
  private readonly start: number;
  private readonly hash = createHash('sha256');
  private stage = Buffer.allocUnsafe(STAGE);
  private stageLen = 0;
  private readonly lim: Limits;
  private readonly onChunk: ((b: Buffer) => void) | undefined;
  private readonly signal: AbortSignal | undefined;
  /** Set when extraction failed and we only keep parsing to stay in sync. */
  ex: Extractor | null;

  constructor(
    private readonly r: WireReader,
    opts: NarReadOptions,
    ex: Extractor | null,
    private readonly drain = false,
  ) {
    this.start = r.offset;
    this.lim = limitsOf(opts);
    this.onChunk = opts.onChunk;
    this.signal = opts.signal;
    this.ex = ex;
  }

  /** Offset inside the NAR of the next byte to be read. */
  get pos(): number {
    return this.r.offset - this.start;
  }

  private flushStage(): void {
    if (this.stageLen === 0) return;
    const b = this.stage.subarray(0, this.stageLen);
    this.hash.update(b);
    this.onChunk?.(b);
    this.stage = Buffer.allocUnsafe(STAGE);
    this.stageLen = 0;
  }

  private account(b: Buffer): void {
    if (b.length <= 4096) {
      if (this.stageLen + b.length > STAGE) this.flushStage();
      b.copy(this.stage, this.stageLen);
      this.stageLen += b.length;
    } else {
      this.flushStage();
      this.hash.update(b);
      this.onChunk?.(b);
    }
  }

  private checkSize(extra: number, what: string): void {
    if (this.pos + extra > this.lim.maxSize) {
      throw new NarError(
        `NAR exceeds the size limit of ${this.lim.maxSize} bytes while reading ${what} (${extra} more bytes needed)`,
        this.pos,
      );
    }
  }

  private truncated(what: string): NarError {
    return new NarError(
      `NAR truncated after ${this.pos + this.r.buffered} bytes: unexpected end of stream while reading ${what}`,
      this.pos,
    );
  }

  private async exact(n: number, what: string): Promise<Buffer> {
    this.checkSize(n, what);
    let b: Buffer;
    try {
      b = await this.r.readExact(n, what);
    } catch (e) {
      if (isEof(e)) throw this.truncated(what);
      throw e;
    }
    this.account(b);
    return b;
  }

  private async u64(what: string): Promise<number> {
    const at = this.pos;
    const b = await this.exact(8, what);
    const hi = b.readUInt32LE(4);
    if (hi >= 0x20_0000) throw new NarError(`${what} is too large (${b.readBigUInt64LE(0)})`, at);
    return hi * 0x1_0000_0000 + b.readUInt32LE(0);
  }

  private async padding(len: number, what: string): Promise<void> {
    const p = padLen(len);
    if (p === 0) return;
    const at = this.pos;
    const b = await this.exact(p, `padding of ${what}`);
    for (let i = 0; i < p; i++) {
      if (b[i] !== 0) throw new NarError(`non-zero padding after ${what}`, at);
    }
  }

  /** A string token of at most `max` bytes (`tooLong` explains the limit). */
  private async str(what: string, max: number, tooLong: (len: number) => string): Promise<Buffer> {
    const at = this.pos;
    const len = await this.u64(`length of ${what}`);
    if (len > max) throw new NarError(tooLong(len), at);
    const data = len === 0 ? Buffer.alloc(0) : await this.exact(len, what);
    await this.padding(len, what);
    return data;
  }

  /** A keyword token; `expected` describes the acceptable ones for the error message. */
  private async keyword(expected: string): Promise<string> {
    const s = await this.str(
      `token (expected ${expected})`,
      MAX_KEYWORD,
      (len) => `expected ${expected}, got a ${len}-byte string`,
    );
    return s.toString('latin1');
  }

  private async expect(tok: string): Promise<void> {
    const at = this.pos;
    const got = await this.keyword(JSON.stringify(tok));
    if (got !== tok)
      throw new NarError(`expected ${JSON.stringify(tok)}, got ${showBytes(Buffer.from(got, 'latin1'))}`, at);
  }

  private checkAbort(): void {
    const s = this.signal;
    if (s?.aborted) throw s.reason instanceof Error ? s.reason : new NarError('NAR transfer aborted', this.pos);
  }

  /** Extraction failed: either give up now or (drain mode) continue parsing only. */
  private checkEx(): void {
    if (this.ex && this.ex.error !== undefined) {
      if (!this.drain) throw this.ex.error;
      this.ex = null;
    }
  }

  async parse(): Promise<NarSummary> {
    const at = this.pos;
    const magic = await this.str(
      'NAR magic',
      MAX_KEYWORD,
      (len) => `not a NAR: expected "nix-archive-1", got a ${len}-byte string`,
    );
    if (magic.toString('latin1') !== 'nix-archive-1') {
      throw new NarError(`not a NAR: expected "nix-archive-1", got ${showBytes(magic)}`, at);
    }
    await this.node(this.ex?.root ?? null, 0);
    this.flushStage();
    const narSize = this.pos;
    return { narHash: this.hash.digest(), narSize };
  }

  private async node(path: Buffer | null, depth: number): Promise<void> {
    this.checkAbort();
    await this.expect('(');
    await this.expect('type');
    const at = this.pos;
    const type = await this.keyword('"regular", "symlink" or "directory"');
    if (type === 'regular') await this.regular(path);
    else if (type === 'symlink') await this.symlink(path);
    else if (type === 'directory') await this.directory(path, depth);
    else {
      throw new NarError(
        `expected "regular", "symlink" or "directory", got ${showBytes(Buffer.from(type, 'latin1'))}`,
        at,
      );
    }
  }

  private async regular(path: Buffer | null): Promise<void> {
    let at = this.pos;
    let kw = await this.keyword('"executable" or "contents"');
    let executable = false;
    if (kw === 'executable') {
      executable = true;
      await this.str('executable marker', 0, (len) => `expected "" after "executable", got a ${len}-byte string`);
      at = this.pos;
      kw = await this.keyword('"contents"');
      if (kw !== 'contents') throw new NarError(`expected "contents", got ${showBytes(Buffer.from(kw, 'latin1'))}`, at);
    } else if (kw !== 'contents') {
      throw new NarError(`expected "executable" or "contents", got ${showBytes(Buffer.from(kw, 'latin1'))}`, at);
    }
    at = this.pos;
    const len = await this.u64('length of file contents');
    if (len > this.lim.maxFileSize) {
      throw new NarError(`file is too large (${len} bytes, at most ${this.lim.maxFileSize} allowed)`, at);
    }
    // The contents, their padding and at least the closing ")" must fit.
    if (this.pos + len + padLen(len) + 16 > this.lim.maxSize) {
      throw new NarError(`file of ${len} bytes does not fit in the NAR size limit of ${this.lim.maxSize} bytes`, at);
    }
    const ex = this.ex;
    const out = ex && path ? ex.file(path) : null;
    let left = len;
    try {
      while (left > 0) {
        this.checkAbort();
        let c: Buffer;
        try {
          c = await this.r.readSome(Math.min(left, READ_CHUNK), 'file contents');
        } catch (e) {
          if (isEof(e)) throw this.truncated(`file contents (${left} of ${len} bytes missing)`);
          throw e;
        }
        left -= c.length;
        this.account(c);
        if (out && this.ex) {
          out.write(c);
          await ex!.room();
          this.checkEx();
        }
      }
    } finally {
      out?.end(executable);
    }
    await this.padding(len, 'file contents');
    await this.expect(')');
    this.checkEx();
  }

  private async symlink(path: Buffer | null): Promise<void> {
    await this.expect('target');
    const at = this.pos;
    const target = await this.str(
      'symlink target',
      this.lim.maxTargetLength,
      (len) => `symlink target is too long (${len} bytes, at most ${this.lim.maxTargetLength} allowed)`,
    );
    if (target.length === 0) throw new NarError('symlink target is empty', at);
    if (target.includes(0)) throw new NarError(`symlink target ${showBytes(target)} contains a NUL byte`, at);
    if (this.ex && path) this.ex.symlink(path, target);
    await this.expect(')');
  }

  private async directory(path: Buffer | null, depth: number): Promise<void> {
    if (this.ex && path) {
      try {
        await this.ex.mkdir(path);
      } catch (e) {
        if (!this.drain) throw e;
        this.ex.error ??= e;
        this.ex = null;
      }
    }
    let prev: Buffer | null = null;
    for (;;) {
      this.checkAbort();
      const at = this.pos;
      const kw = await this.keyword('"entry" or ")"');
      if (kw === ')') return;
      if (kw !== 'entry')
        throw new NarError(`expected "entry" or ")", got ${showBytes(Buffer.from(kw, 'latin1'))}`, at);
      if (depth + 1 > this.lim.maxDepth) {
        throw new NarError(`directories are nested too deeply (more than ${this.lim.maxDepth} levels)`, at);
      }
      await this.expect('(');
      await this.expect('name');
      const nameAt = this.pos;
      const name = await this.str(
        'entry name',
        this.lim.maxNameLength,
        (len) => `entry name is too long (${len} bytes, at most ${this.lim.maxNameLength} allowed)`,
      );
      checkName(name, nameAt);
      if (prev !== null) {
        const c = Buffer.compare(prev, name);
        if (c === 0) throw new NarError(`duplicate entry name ${showBytes(name)}`, nameAt);
        if (c > 0) {
          throw new NarError(`entry names are not sorted: ${showBytes(name)} comes after ${showBytes(prev)}`, nameAt);
        }
      }
      prev = name;
      await this.expect('node');
      await this.node(this.ex && path ? joinPath(path, name) : null, depth + 1);
      await this.expect(')');
      this.checkEx();
    }
  }

  async expectEnd(): Promise<void> {
    if (!(await this.r.atEof())) {
      throw new NarError(`unexpected data after the end of the NAR (${this.r.buffered}+ bytes)`, this.pos);
    }
  }
}

function checkName(name: Buffer, at: number): void {
  if (name.length === 0) throw new NarError('empty entry name', at);
  if ((name.length === 1 && name[0] === 0x2e) || (name.length === 2 && name[0] === 0x2e && name[1] === 0x2e)) {
    throw new NarError(`invalid entry name ${showBytes(name)}`, at);
  }
  if (name.includes(0x2f)) throw new NarError(`entry name ${showBytes(name)} contains "/"`, at);
  if (name.includes(0)) throw new NarError(`entry name ${showBytes(name)} contains a NUL byte`, at);
}

/**
 * Parse and check exactly one NAR from `reader` without extracting it (e.g. to validate, hash or drain it). Stops
 * right after the closing token.
 */
export async function parseNar(reader: WireReader, opts: NarReadOptions = {}): Promise<NarSummary> {
  const p = new NarParser(reader, opts, null);
  const res = await p.parse();
  if (opts.expectEnd) await p.expectEnd();
  return res;
}

/**
 * Read exactly one NAR from `reader` (stopping right after its closing token) and extract it at `dest`, which must
 * not exist. The tree is built in a fresh directory entry beside `dest` and renamed into place only when the NAR is
 * complete and valid, with canonical store metadata (files 0444 / 0555, directories 0555, mtime 1). On any failure
 * nothing is left behind.
 */
export async function restoreNar(reader: WireReader, dest: string, opts: RestoreOptions = {}): Promise<NarSummary> {
  if (
    await pLstat(dest).then(
      () => true,
      () => false,
    )
  ) {
    throw new Error(`cannot restore a NAR to ${dest}: it already exists`);
  }
  const tmp = `${dest}.tmp-${randomBytes(8).toString('hex')}`;
  const ex = new Extractor(dest, tmp);
  const p = new NarParser(reader, opts, ex, opts.drainOnIoError ?? false);
  try {
    const res = await p.parse();
    if (opts.expectEnd) await p.expectEnd();
    await ex.settle();
    if (ex.error !== undefined) throw ex.error;
    await ex.finishDirs().catch((e) => Promise.reject(ex.wrap(e)));
    if (
      await pLstat(dest).then(
        () => true,
        () => false,
      )
    ) {
      throw new Error(`cannot restore a NAR to ${dest}: it appeared while the NAR was being read`);
    }
    await fs.promises.rename(tmp, dest).catch((e) => Promise.reject(ex.wrap(e)));
    return res;
  } catch (e) {
    await ex.removeAll().catch(() => {});
    throw e;
  }
}
