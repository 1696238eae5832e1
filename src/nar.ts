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
 *
 * The file system work of both directions runs in one shared worker thread with synchronous calls, batched: the event
 * loop never waits long on the disk, and a tree of many small files costs no thread-pool round trip per system call.
 * Only the first few nodes of an extraction (at most 16, and 256 KiB of contents) are made in-thread, which is all a
 * small store path needs: a message round trip to the worker would cost more than those few system calls. The main
 * thread parses, validates and hashes. Memory is bounded (a few MiB of chunks ahead for a dump, at most 4 MiB
 * queued for extraction), whatever the size of the NAR.
 */
import { createHash, type Hash, randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import { Worker } from 'node:worker_threads';
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

/** Streaming sha256 + size over NAR bytes, e.g. `dumpPath(p, { onChunk: (b) => hasher.update(b) })`. */
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

// The main thread only reads NARs; the writer's tokens live in the worker.
const MAGIC = tokenBytes('nix-archive-1');
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

/** Runs of tokens the reader recognises in one comparison when they are already buffered. */
const S_OPEN_TYPE = Buffer.concat([T_OPEN, T_TYPE]);
const S_REGULAR = Buffer.concat([T_REGULAR, T_CONTENTS]);
const S_EXECUTABLE = Buffer.concat([T_REGULAR, T_EXECUTABLE, T_EMPTY, T_CONTENTS]);
const S_SYMLINK = Buffer.concat([T_SYMLINK, T_TARGET]);
const S_ENTRY = Buffer.concat([T_ENTRY, T_OPEN, T_NAME]);
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

function pLstat(path: string | Buffer): Promise<fs.Stats> {
  return new Promise((res, rej) => fs.lstat(path, (e, st) => (e ? rej(e) : res(st))));
}

/** Does anything exist at `path` (a symlink counts)? An error other than "not found" counts as no, like `pLstat`. */
export function lexists(path: string): boolean {
  try {
    return fs.lstatSync(path, { throwIfNoEntry: false }) !== undefined;
  } catch {
    return false;
  }
}

/** Random bytes for unique names, drawn from a pool (one `randomFillSync` per 512 names, not one per name). */
const randomPool = Buffer.allocUnsafe(4096);
let randomPos = randomPool.length;

/** `n` random bytes (n ≤ 64) as hex. */
export function randomHex(n: number): string {
  if (randomPos + n > randomPool.length) {
    randomFillSync(randomPool);
    randomPos = 0;
  }
  randomPos += n;
  return randomPool.toString('hex', randomPos - n, randomPos);
}

// ---------------------------------------------------------------------------------------------------------------
// The I/O worker: one shared worker thread performs the file system work of both directions synchronously — walking
// and reading a tree for `dumpPath`, creating one for `restoreNar` — so that the event loop never blocks on the file
// system and many small files cost no thread-pool round trip per system call. Work travels in batches: a dump
// replies with ~1 MiB chunks of finished NAR bytes; an extraction posts ~1 MiB batches of operations and data.
// ---------------------------------------------------------------------------------------------------------------

const OP_MKDIR = 1;
const OP_OPEN = 2;
const OP_WRITE = 3;
const OP_END = 4;
const OP_SYMLINK = 5;
const OP_FIXDIR = 6;

/** The worker: plain CommonJS (evaluated with `eval: true`), so it runs the same from sources, tests and dist. */
const WORKER_SOURCE = `
'use strict';
const { parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const C = fs.constants;

// ---- extraction: run batches of operations; paths and data are (offset, length) into the batch's data buffer ----
const O_CREATE = C.O_WRONLY | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW;
// Files are created with their final mode; fchmod is only needed when the umask would strip some of its bits.
const needChmod = (process.umask() & 0o555) !== 0;
const extractions = new Map();
function closeAll(job) {
  for (const fd of job.fds.values()) { try { fs.closeSync(fd); } catch {} }
  job.fds.clear();
}
function run(job, ops, data) {
  const b = (i) => data.subarray(ops[i], ops[i] + ops[i + 1]);
  for (let i = 0; i < ops.length; ) {
    switch (ops[i]) {
      case ${OP_MKDIR}: fs.mkdirSync(b(i + 1), 0o700); job.created = true; i += 3; break;
      case ${OP_OPEN}: job.fds.set(ops[i + 1], fs.openSync(b(i + 2), O_CREATE, ops[i + 4])); job.created = true; i += 5; break;
      case ${OP_WRITE}: {
        const fd = job.fds.get(ops[i + 1]);
        let off = ops[i + 2];
        const end = off + ops[i + 3];
        while (off < end) off += fs.writeSync(fd, data, off, end - off);
        i += 4;
        break;
      }
      case ${OP_END}: {
        const fd = job.fds.get(ops[i + 1]);
        job.fds.delete(ops[i + 1]);
        try {
          if (needChmod) fs.fchmodSync(fd, ops[i + 2]);
          fs.futimesSync(fd, 1, 1);
        } finally {
          fs.closeSync(fd);
        }
        i += 3;
        break;
      }
      case ${OP_SYMLINK}: { const p = b(i + 1); fs.symlinkSync(b(i + 3), p); job.created = true; fs.lutimesSync(p, 1, 1); i += 5; break; }
      case ${OP_FIXDIR}: { const p = b(i + 1); fs.chmodSync(p, 0o555); fs.utimesSync(p, 1, 1); i += 3; break; }
      default: throw new Error('bad NAR extraction op ' + ops[i]);
    }
  }
}
function extract(m) {
  let job = extractions.get(m.id);
  // created: some node (so the first, the top-level one) was made by this job, so there is something to remove.
  if (!job) extractions.set(m.id, (job = { fds: new Map(), failed: false, created: false }));
  let error;
  if (!job.failed && m.nops > 0) {
    try {
      run(job, new Int32Array(m.ops, 0, m.nops), m.data ? Buffer.from(m.data) : Buffer.alloc(0));
    } catch (e) {
      job.failed = true;
      closeAll(job);
      error = { message: String(e && e.message), code: e && e.code };
    }
  }
  if (m.last) { closeAll(job); extractions.delete(m.id); }
  // The batch's buffers go back to be reused (fresh ones would cost page faults and garbage collection).
  const back = m.data ? [m.ops, m.data] : [m.ops];
  const reply = { id: m.id, bytes: m.bytes, last: !!m.last, error, created: job.created, ops: m.ops, data: m.data };
  parentPort.postMessage(reply, back);
}

// ---- dump: a depth-first walk that serialises straight into the reply buffer ----
function token(s) {
  const d = Buffer.from(s, 'latin1');
  const o = Buffer.alloc(8 + d.length + ((8 - (d.length % 8)) % 8));
  o.writeUInt32LE(d.length, 0);
  d.copy(o, 8);
  return o;
}
const T_MAGIC = token('nix-archive-1');
const T_OPEN = token('(');
const T_CLOSE = token(')');
const T_TYPE = token('type');
const T_NODE = token('node');
const H_REGULAR = Buffer.concat([T_OPEN, T_TYPE, token('regular'), token('contents')]);
const H_EXECUTABLE = Buffer.concat([T_OPEN, T_TYPE, token('regular'), token('executable'), token(''), token('contents')]);
const H_SYMLINK = Buffer.concat([T_OPEN, T_TYPE, token('symlink'), token('target')]);
const H_DIRECTORY = Buffer.concat([T_OPEN, T_TYPE, token('directory')]);
const H_ENTRY = Buffer.concat([token('entry'), T_OPEN, token('name')]);
const ZEROS = Buffer.alloc(8);
const SLASH = Buffer.from('/');
const O_READ = C.O_RDONLY | C.O_NOFOLLOW | C.O_NONBLOCK;
const S_IXUSR = 0o100;

function dumpError(message) {
  const e = new Error(message);
  e.dump = true;
  return e;
}
function kindName(k) {
  if (k.isSocket()) return 'a socket';
  if (k.isFIFO()) return 'a named pipe';
  if (k.isCharacterDevice()) return 'a character device';
  if (k.isBlockDevice()) return 'a block device';
  return 'of an unknown file type';
}

class Dump {
  constructor(root, cap) {
    this.cap = cap;
    this.tok = Buffer.allocUnsafe(64 * 1024);
    this.tokStart = 0;
    this.tokEnd = 0;
    this.stack = [];
    this.fd = -1;
    this.path = null;
    this.size = 0;
    this.left = 0;
    this.finished = false;
    this.node = { path: root, kind: fs.lstatSync(root) };
    this.raw(T_MAGIC);
  }
  raw(b) {
    if (this.tokEnd + b.length > this.tok.length) {
      const bigger = Buffer.allocUnsafe(Math.max(this.tok.length * 2, this.tokEnd - this.tokStart + b.length));
      this.tokEnd = this.tok.copy(bigger, 0, this.tokStart, this.tokEnd);
      this.tokStart = 0;
      this.tok = bigger;
    }
    this.tokEnd += b.copy(this.tok, this.tokEnd);
  }
  u64(v) {
    const b = Buffer.allocUnsafe(8);
    b.writeUInt32LE(v % 0x100000000, 0);
    b.writeUInt32LE(Math.floor(v / 0x100000000), 4);
    this.raw(b);
  }
  pad(n) {
    const p = (8 - (n % 8)) % 8;
    if (p > 0) this.raw(ZEROS.subarray(0, p));
  }
  str(b) {
    this.u64(b.length);
    this.raw(b);
    this.pad(b.length);
  }
  /** The node is complete: close it (and the entry holding it), then find the next one. */
  closeNode() {
    this.raw(T_CLOSE);
    if (this.stack.length > 0) this.raw(T_CLOSE);
    this.advance();
  }
  advance() {
    while (this.stack.length > 0) {
      const f = this.stack[this.stack.length - 1];
      if (f.i < f.entries.length) {
        const d = f.entries[f.i++];
        this.raw(H_ENTRY);
        this.str(d.name);
        this.raw(T_NODE);
        this.node = { path: Buffer.concat([f.path, SLASH, d.name]), kind: d };
        return;
      }
      this.raw(T_CLOSE); // end of the directory node
      this.stack.pop();
      if (this.stack.length > 0) this.raw(T_CLOSE); // end of the entry holding it
    }
    this.finished = true;
  }
  emitNode() {
    const { path, kind } = this.node;
    this.node = null;
    if (kind.isFile()) {
      let fd;
      try {
        fd = fs.openSync(path, O_READ);
      } catch (e) {
        if (e.code === 'ELOOP') throw dumpError('cannot dump ' + path.toString() + ': it became a symlink while being dumped');
        throw e;
      }
      let st;
      try {
        st = fs.fstatSync(fd);
        if (!st.isFile()) throw dumpError('cannot dump ' + path.toString() + ': it changed type while being dumped');
      } catch (e) {
        fs.closeSync(fd);
        throw e;
      }
      this.raw((st.mode & S_IXUSR) !== 0 ? H_EXECUTABLE : H_REGULAR);
      this.u64(st.size);
      if (st.size === 0) {
        fs.closeSync(fd);
        this.closeNode();
      } else {
        this.fd = fd;
        this.path = path;
        this.size = this.left = st.size;
      }
    } else if (kind.isSymbolicLink()) {
      const target = fs.readlinkSync(path, { encoding: 'buffer' });
      this.raw(H_SYMLINK);
      this.str(target);
      this.closeNode();
    } else if (kind.isDirectory()) {
      const entries = fs.readdirSync(path, { withFileTypes: true, encoding: 'buffer' });
      entries.sort((a, b) => Buffer.compare(a.name, b.name));
      this.raw(H_DIRECTORY);
      this.stack.push({ path, entries, i: 0 });
      this.advance();
    } else {
      throw dumpError('cannot put ' + path.toString() + ' in a NAR: it is ' + kindName(kind) +
        ' (only regular files, symlinks and directories can be)');
    }
  }
  /** Fill out[0..cap) with the next NAR bytes; returns how many (fewer only at the end). */
  fill(out) {
    let n = 0;
    const cap = out.length;
    while (n < cap) {
      if (this.tokStart < this.tokEnd) {
        const k = Math.min(cap - n, this.tokEnd - this.tokStart);
        this.tok.copy(out, n, this.tokStart, this.tokStart + k);
        n += k;
        this.tokStart += k;
        if (this.tokStart === this.tokEnd) this.tokStart = this.tokEnd = 0;
      } else if (this.fd >= 0) {
        const r = fs.readSync(this.fd, out, n, Math.min(cap - n, this.left), this.size - this.left);
        if (r === 0) throw dumpError('cannot dump ' + this.path.toString() + ': the file shrank while being dumped');
        n += r;
        this.left -= r;
        if (this.left === 0) {
          fs.closeSync(this.fd);
          this.fd = -1;
          this.pad(this.size);
          this.closeNode();
        }
      } else if (this.node !== null) {
        this.emitNode();
      } else {
        break;
      }
    }
    return n;
  }
  get done() {
    return this.finished && this.node === null && this.fd < 0 && this.tokStart === this.tokEnd;
  }
  close() {
    if (this.fd >= 0) { try { fs.closeSync(this.fd); } catch {} }
    this.fd = -1;
  }
}

const dumps = new Map();
function errorOf(e) {
  return { message: String(e && e.message), code: e && e.code, dump: !!(e && e.dump) };
}
function dumpStart(m) {
  try {
    dumps.set(m.id, new Dump(Buffer.from(m.path, 'latin1'), m.cap));
  } catch (e) {
    dumps.set(m.id, { error: errorOf(e) });
  }
}
// A request may bring a buffer to fill (one the consumer is done with); an unused one goes back with the reply.
function dumpMore(m) {
  const d = dumps.get(m.id);
  const back = m.buf ? [m.buf] : [];
  if (!d) return parentPort.postMessage({ id: m.id, len: 0, done: true, data: m.buf }, back);
  if (d.error) {
    dumps.delete(m.id);
    return parentPort.postMessage({ id: m.id, len: 0, done: true, error: d.error, data: m.buf }, back);
  }
  const out = m.buf && m.buf.byteLength === d.cap ? Buffer.from(m.buf) : Buffer.allocUnsafeSlow(d.cap);
  let n;
  try {
    n = d.fill(out);
  } catch (e) {
    d.close();
    dumps.delete(m.id);
    return parentPort.postMessage({ id: m.id, len: 0, done: true, error: errorOf(e), data: m.buf }, back);
  }
  const done = d.done;
  if (done) dumps.delete(m.id);
  parentPort.postMessage({ id: m.id, data: out.buffer, len: n, done }, [out.buffer]);
}
function dumpCancel(m) {
  const d = dumps.get(m.id);
  if (d && d.close) d.close();
  dumps.delete(m.id);
}

parentPort.on('message', (m) => {
  switch (m.k) {
    case 'x': return extract(m);
    case 'ds': return dumpStart(m);
    case 'dm': return dumpMore(m);
    case 'dc': return dumpCancel(m);
  }
});
`;

interface WorkerReply {
  id: number;
  /** Extraction: bytes of the acknowledged batch, whether it was the job's last, whether it has created a node. */
  bytes?: number;
  last?: boolean;
  created?: boolean;
  /** Dump: a chunk of NAR bytes (`len` of `data`), and whether the NAR is complete. Extraction: the batch's buffers. */
  data?: ArrayBuffer;
  ops?: ArrayBuffer;
  len?: number;
  done?: boolean;
  error?: { message: string; code?: string; dump?: boolean };
}

/**
 * The process-wide I/O worker, started on first use. It keeps the process alive only while a reply is awaited, so an
 * abandoned dump (a generator neither finished nor closed) cannot keep a process from exiting, while an operation in
 * progress cannot be cut short by the process exiting under it.
 */
class IoWorker {
  private static instance: IoWorker | null = null;
  private readonly w: Worker;
  private readonly jobs = new Map<number, (m: WorkerReply) => void>();
  private nextId = 1;
  /** Requests posted and not yet answered. */
  private awaited = 0;
  dead: Error | null = null;

  static get(): IoWorker {
    if (IoWorker.instance === null || IoWorker.instance.dead) IoWorker.instance = new IoWorker();
    return IoWorker.instance;
  }

  private constructor() {
    this.w = new Worker(WORKER_SOURCE, { eval: true, name: 'buildbox-nar-io' });
    this.w.unref();
    this.w.on('message', (m: WorkerReply) => {
      if (--this.awaited === 0) this.w.unref();
      this.jobs.get(m.id)?.(m);
    });
    const die = (e: Error) => {
      this.dead ??= e;
      this.awaited = 0;
      this.w.unref();
      if (IoWorker.instance === this) IoWorker.instance = null;
      // Every job still open learns it is over (each closes itself, removing it from the map).
      for (const [id, cb] of this.jobs) this.deadReply(id, cb);
    };
    this.w.on('error', die);
    this.w.on('exit', (code) => die(new Error(`the NAR I/O worker exited (code ${code})`)));
  }

  private deadReply(id: number, cb: (m: WorkerReply) => void): void {
    cb({ id, bytes: 0, last: true, len: 0, done: true, error: { message: this.dead!.message } });
  }

  open(onReply: (m: WorkerReply) => void): number {
    const id = this.nextId++;
    this.jobs.set(id, onReply);
    return id;
  }

  close(id: number): void {
    this.jobs.delete(id);
  }

  /** Post a message; `reply` says whether the worker answers it (every extraction batch and dump request does). */
  post(msg: { k: string; id: number; [key: string]: unknown }, transfer: ArrayBuffer[] = [], reply = true): void {
    if (this.dead) {
      const cb = this.jobs.get(msg.id);
      if (cb && reply) queueMicrotask(() => this.deadReply(msg.id, cb));
      return;
    }
    if (reply && this.awaited++ === 0) this.w.ref();
    this.w.postMessage(msg, transfer);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------------------------

export interface DumpOptions {
  /** Called with every chunk, in order, before it is yielded (e.g. a `NarHasher` or a reference scanner). */
  onChunk?: (b: Buffer) => void;
  /** Size of the chunks (default 1 MiB): file contents are read straight into them, tokens are batched into them. */
  chunkSize?: number;
  /**
   * Lend the chunks instead of giving them: each one is valid only until the consumer asks for the next one (or
   * stops), then its memory is filled again with later NAR bytes. For consumers that pass each chunk on and wait
   * until it is gone (`WireWriter.writeBorrowed`): a NAR then streams through a few reused buffers instead of a fresh
   * megabyte per chunk, which the garbage collector would free only much later.
   */
  recycle?: boolean;
}

/** How many chunks the worker may prepare ahead of the consumer. */
const DUMP_AHEAD = 4;
const DEFAULT_CHUNK = 1024 * 1024;
/** Chunk buffers (of the default size) that lent chunks were in, for the next requests of any dump. */
const spareChunks: ArrayBuffer[] = [];
const SPARE_CHUNKS = 8;

function spareChunk(ab: ArrayBuffer | undefined): void {
  if (ab && ab.byteLength === DEFAULT_CHUNK && spareChunks.length < SPARE_CHUNKS) spareChunks.push(ab);
}

/** One dump in the worker: chunks are requested ahead and handed out in order. */
class DumpJob {
  private readonly worker = IoWorker.get();
  private readonly id: number;
  private readonly ready: Buffer[] = [];
  private waiter: (() => void) | null = null;
  private done = false;
  private error: Error | null = null;
  private closed = false;
  /** With `recycle`: the buffer of the chunk the consumer has now, taken back when it asks for the next one. */
  private lent: ArrayBuffer | null = null;

  constructor(
    root: Buffer,
    private readonly cap: number,
    private readonly recycle: boolean,
  ) {
    this.id = this.worker.open((m) => this.reply(m));
    this.worker.post({ k: 'ds', id: this.id, path: root.toString('latin1'), cap }, [], false);
    for (let i = 0; i < DUMP_AHEAD; i++) this.request();
  }

  private request(): void {
    if (this.done || this.error !== null) return;
    const buf = this.cap === DEFAULT_CHUNK ? spareChunks.pop() : undefined;
    if (buf) this.worker.post({ k: 'dm', id: this.id, buf }, [buf]);
    else this.worker.post({ k: 'dm', id: this.id });
  }

  private reply(m: WorkerReply): void {
    if (m.error) {
      this.error ??= m.error.dump
        ? new NarDumpError(m.error.message)
        : Object.assign(new Error(m.error.message), { code: m.error.code });
      this.finish();
    } else {
      if (m.data && m.len) {
        // A short last chunk is copied so that it does not pin a whole chunk-sized buffer (unless it is lent).
        const b = Buffer.from(m.data, 0, m.len);
        this.ready.push(m.len < this.cap / 4 && !this.recycle ? Buffer.from(b) : b);
      } else spareChunk(m.data);
      if (m.done) this.finish();
    }
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  private finish(): void {
    this.done = true;
    if (!this.closed) {
      this.closed = true;
      this.worker.close(this.id);
    }
  }

  /** The consumer is done with the chunk it had (when lent). */
  private takeBack(): void {
    spareChunk(this.lent ?? undefined);
    this.lent = null;
  }

  async next(): Promise<Buffer | null> {
    this.takeBack();
    for (;;) {
      const b = this.ready.shift();
      if (b !== undefined) {
        if (this.recycle) this.lent = b.buffer as ArrayBuffer;
        this.request();
        return b;
      }
      if (this.error) throw this.error;
      if (this.done) return null;
      await new Promise<void>((r) => {
        this.waiter = r;
      });
    }
  }

  /** The consumer stopped early: the worker closes the open file and forgets the walk. */
  cancel(): void {
    this.takeBack();
    if (this.closed) return;
    this.worker.post({ k: 'dc', id: this.id }, [], false);
    this.done = true;
    this.closed = true;
    this.worker.close(this.id);
  }
}

/**
 * Serialise the file system object at `fsPath` (not following a top-level symlink) as a NAR, in chunks of at most
 * `chunkSize` bytes — exactly the bytes `nix-store --dump` produces. Directory entries are sorted bytewise; file
 * contents are read straight into the chunks and never held whole; sockets, devices and FIFOs are refused with an
 * error naming the path. The chunks are fresh buffers the consumer may keep (unless `recycle`). Stopping early
 * (`break`, `return()`) closes everything.
 */
export async function* dumpPath(fsPath: string | Buffer, opts: DumpOptions = {}): AsyncGenerator<Buffer> {
  const root = typeof fsPath === 'string' ? Buffer.from(fsPath) : fsPath;
  const chunkSize = opts.chunkSize ?? 1024 * 1024;
  if (!Number.isSafeInteger(chunkSize) || chunkSize < 1 || chunkSize > 1 << 30) {
    throw new RangeError(`dumpPath: chunkSize must be an integer from 1 to 2^30, not ${chunkSize}`);
  }
  const job = new DumpJob(root, chunkSize, opts.recycle === true);
  const onChunk = opts.onChunk;
  try {
    for (;;) {
      const b = await job.next();
      if (b === null) return;
      onChunk?.(b);
      yield b;
    }
  } finally {
    job.cancel();
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
  /**
   * `dest` is a fresh name in a directory that only the caller uses (a store's scratch space): build the tree there
   * directly, with no temporary name beside it, no existence checks and no final rename. Making the top-level node
   * still never replaces anything (the restore fails if `dest` exists), and on failure what was made is removed.
   */
  direct?: boolean;
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

// ---------------------------------------------------------------------------------------------------------------
// Extraction (in-thread for small trees, else through the I/O worker)
// ---------------------------------------------------------------------------------------------------------------

/** Data bytes per batch. */
const BATCH_DATA = 1024 * 1024;
/** Operations travel as an Int32Array of (opcode, operands…); a batch is posted when it holds this many numbers. */
const BATCH_OPS = 16 * 1024;
/**
 * How much may be posted but not yet written. A few batches keep the worker busy (writing to the page cache is far
 * faster than the network); more would only raise the box's memory (bench P5: 16 MiB cost ~10 MiB of peak RSS).
 */
const MAX_INFLIGHT = 4 * 1024 * 1024;

/** Batch buffers handed back by the worker, for the next batches of any extraction. */
const spareData: ArrayBuffer[] = [];
const spareOps: ArrayBuffer[] = [];
const SPARES = 4;
const OPS_BYTES = (BATCH_OPS + 8) * 4;

function newData(): Buffer {
  const ab = spareData.pop();
  return ab ? Buffer.from(ab) : Buffer.allocUnsafeSlow(BATCH_DATA);
}

function newOps(): Int32Array {
  return new Int32Array(spareOps.pop() ?? new ArrayBuffer(OPS_BYTES));
}

/**
 * Files and directories a small tree may create in-thread, and the file contents it may write there, before the rest
 * of the extraction goes to the I/O worker. A small NAR (most store paths: one file, a `.drv`, a short script) then
 * costs a few synchronous system calls instead of messages to and from the worker, while a large or many-file tree
 * still never holds up the event loop for long.
 */
const SYNC_NODES = 16;
const SYNC_BYTES = 256 * 1024;
const O_CREATE = fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL | fs.constants.O_NOFOLLOW;
/** Like the worker: files are created with their final mode; fchmod only when the umask strips some of its bits. */
let needChmod: boolean | undefined;

/**
 * Builds the tree; the parser calls it in NAR order. The first nodes are created in-thread, synchronously, while the
 * tree stays within `SYNC_NODES` / `SYNC_BYTES`; from the first node that would exceed that, everything else goes
 * through the worker in batches (the worker runs them after what was already done, in order). The operations, their
 * checks and their errors are the same either way.
 */
class Extractor {
  /** Directories created, in creation order (parents first). */
  readonly dirs: Buffer[] = [];
  readonly root: Buffer;
  error: NarRestoreError | undefined = undefined;
  /** Still in-thread: nothing has been handed to the worker. */
  private sync = true;
  private syncNodes = 0;
  private syncBytes = 0;
  /** In-thread open files (file id → fd). */
  private readonly fds = new Map<number, number>();
  /** The top-level node was made here (in-thread or by the worker): only then is there anything to remove. */
  private created = false;
  private worker: IoWorker | null = null;
  private id = 0;
  private ops: Int32Array | null = null;
  private nops = 0;
  private data: Buffer | null = null;
  private dataLen = 0;
  private inflight = 0;
  private nextFile = 1;
  private waiter: (() => void) | null = null;
  private finished: ((err: NarRestoreError | undefined) => void) | null = null;
  /** The last batch has been posted: nothing more is sent. */
  private closed = false;
  /** The worker has finished with this job (all its files closed). */
  private done = false;

  constructor(
    readonly dest: string,
    readonly tmp: string,
  ) {
    this.root = Buffer.from(tmp);
  }

  wrap(e: unknown): NarRestoreError {
    return e instanceof NarRestoreError ? e : new NarRestoreError(this.dest, this.tmp, e);
  }

  /** True while everything has been done in-thread (then `finish` and the final rename are synchronous too). */
  get inThread(): boolean {
    return this.sync;
  }

  /** May the next node (creating `bytes` of file contents) still be created in-thread? Otherwise go to the worker. */
  private stayInThread(bytes: number): boolean {
    if (!this.sync) return false;
    if (this.error !== undefined) return true; // nothing more is done after a failure
    if (this.syncNodes < SYNC_NODES && this.syncBytes + bytes <= SYNC_BYTES) {
      this.syncNodes++;
      this.syncBytes += bytes;
      return true;
    }
    // Every in-thread file is closed here (nodes are created one after the other), so the worker starts afresh.
    this.sync = false;
    this.worker = IoWorker.get();
    this.id = this.worker.open((m) => this.reply(m));
    return false;
  }

  /** An in-thread operation failed: like the worker, stop doing anything more and close what is open. */
  private fail(e: unknown): void {
    this.error ??= this.wrap(e);
    this.closeFds();
  }

  private closeFds(): void {
    for (const fd of this.fds.values()) {
      try {
        fs.closeSync(fd);
      } catch {}
    }
    this.fds.clear();
  }

  private reply(m: WorkerReply): void {
    this.inflight -= m.bytes ?? 0;
    if (m.created) this.created = true;
    if (m.data?.byteLength === BATCH_DATA && spareData.length < SPARES) spareData.push(m.data);
    if (m.ops?.byteLength === OPS_BYTES && spareOps.length < SPARES) spareOps.push(m.ops);
    if (m.error && this.error === undefined) {
      const e = Object.assign(new Error(m.error.message), { code: m.error.code });
      this.error = this.wrap(e);
    }
    const w = this.waiter;
    this.waiter = null;
    w?.();
    if (m.last) {
      this.done = true;
      this.closed = true;
      this.worker!.close(this.id);
      const f = this.finished;
      this.finished = null;
      f?.(this.error);
    }
  }

  private flush(last = false): void {
    if (this.closed) return;
    if (!last && this.nops === 0) return;
    const bytes = this.dataLen + this.nops * 4;
    this.inflight += bytes;
    const data = this.data && this.dataLen > 0 ? (this.data.buffer as ArrayBuffer) : null;
    if (this.data && data === null && this.data.length === BATCH_DATA && spareData.length < SPARES) {
      spareData.push(this.data.buffer as ArrayBuffer);
    }
    const ops = (this.ops ?? newOps()).buffer as ArrayBuffer;
    this.worker!.post({ k: 'x', id: this.id, ops, nops: this.nops, data, bytes, last }, data ? [ops, data] : [ops]);
    this.ops = null;
    this.nops = 0;
    this.data = null;
    this.dataLen = 0;
    if (last) this.closed = true;
  }

  /** Post a full batch; true when so much is queued for the worker that the parser should `wait()`. */
  busy(): boolean {
    if (this.sync) return false;
    if (this.nops >= BATCH_OPS || this.dataLen >= BATCH_DATA) this.flush();
    return this.inflight > MAX_INFLIGHT && this.error === undefined && !this.done;
  }

  async wait(): Promise<void> {
    while (this.busy()) {
      await new Promise<void>((r) => {
        this.waiter = r;
      });
    }
  }

  private room(k: number): Int32Array {
    if (this.ops === null) this.ops = newOps();
    if (this.nops + k > this.ops.length) {
      const bigger = new Int32Array(this.ops.length * 2);
      bigger.set(this.ops.subarray(0, this.nops));
      this.ops = bigger;
    }
    return this.ops;
  }
  private push3(a: number, b: number, c: number): void {
    const o = this.room(3);
    const n = this.nops;
    o[n] = a;
    o[n + 1] = b;
    o[n + 2] = c;
    this.nops = n + 3;
  }
  private push4(a: number, b: number, c: number, d: number): void {
    const o = this.room(4);
    const n = this.nops;
    o[n] = a;
    o[n + 1] = b;
    o[n + 2] = c;
    o[n + 3] = d;
    this.nops = n + 4;
  }
  private push5(a: number, b: number, c: number, d: number, e: number): void {
    const o = this.room(5);
    const n = this.nops;
    o[n] = a;
    o[n + 1] = b;
    o[n + 2] = c;
    o[n + 3] = d;
    o[n + 4] = e;
    this.nops = n + 5;
  }

  /** Make room for `n` more data bytes in the current batch (posting it if full). */
  private reserve(n: number): Buffer {
    if (this.data !== null && this.dataLen + n > this.data.length) this.flush();
    if (this.data === null) this.data = n <= BATCH_DATA ? newData() : Buffer.allocUnsafeSlow(n);
    return this.data;
  }

  /** Copy paths into the batch's data (cloning Buffers with a message would copy their whole pool). */
  private paths(op: number, a: Buffer, b?: Buffer): void {
    const data = this.reserve(a.length + (b?.length ?? 0));
    const offA = this.dataLen;
    this.dataLen += a.copy(data, offA);
    if (b === undefined) {
      this.push3(op, offA, a.length);
      return;
    }
    const offB = this.dataLen;
    this.dataLen += b.copy(data, offB);
    this.push5(op, offA, a.length, offB, b.length);
  }

  mkdir(path: Buffer): void {
    this.dirs.push(path);
    if (!this.stayInThread(0)) {
      this.paths(OP_MKDIR, path);
      return;
    }
    if (this.error !== undefined) return;
    try {
      fs.mkdirSync(path, 0o700);
      this.created = true;
    } catch (e) {
      this.fail(e);
    }
  }

  symlink(path: Buffer, target: Buffer): void {
    if (!this.stayInThread(0)) {
      this.paths(OP_SYMLINK, path, target);
      return;
    }
    if (this.error !== undefined) return;
    try {
      fs.symlinkSync(target, path);
      this.created = true;
      fs.lutimesSync(path, 1, 1);
    } catch (e) {
      this.fail(e);
    }
  }

  /** Start a regular file of `size` bytes; returns its id for `write` and `end`. */
  open(path: Buffer, executable: boolean, size: number): number {
    const id = this.nextFile++;
    const mode = executable ? 0o555 : 0o444;
    if (this.stayInThread(size)) {
      if (this.error === undefined) {
        try {
          this.fds.set(id, fs.openSync(path, O_CREATE, mode));
          this.created = true;
        } catch (e) {
          this.fail(e);
        }
      }
      return id;
    }
    const data = this.reserve(path.length);
    this.push5(OP_OPEN, id, this.dataLen, path.length, mode);
    this.dataLen += path.copy(data, this.dataLen);
    return id;
  }

  write(file: number, chunk: Buffer): void {
    const fd = this.fds.get(file);
    if (fd !== undefined) {
      try {
        let off = 0;
        while (off < chunk.length) off += fs.writeSync(fd, chunk, off, chunk.length - off);
      } catch (e) {
        this.fail(e);
      }
      return;
    }
    if (this.sync) return; // an in-thread file that failed
    let off = 0;
    while (off < chunk.length) {
      if (this.data === null) this.data = newData();
      const n = Math.min(chunk.length - off, this.data.length - this.dataLen);
      chunk.copy(this.data, this.dataLen, off, off + n);
      this.push4(OP_WRITE, file, this.dataLen, n);
      this.dataLen += n;
      off += n;
      if (this.dataLen === this.data.length) this.flush();
    }
  }

  end(file: number, executable: boolean): void {
    const fd = this.fds.get(file);
    if (fd !== undefined) {
      this.fds.delete(file);
      try {
        try {
          needChmod ??= (process.umask() & 0o555) !== 0;
          if (needChmod) fs.fchmodSync(fd, executable ? 0o555 : 0o444);
          fs.futimesSync(fd, 1, 1);
        } finally {
          fs.closeSync(fd);
        }
      } catch (e) {
        this.fail(e);
      }
      return;
    }
    if (this.sync) return;
    this.push3(OP_END, file, executable ? 0o555 : 0o444);
  }

  /** Everything written: fix up the directories (children first) and wait for the worker, if it was used. */
  async finish(): Promise<void> {
    if (this.sync) return this.finishInThread();
    for (let i = this.dirs.length - 1; i >= 0; i--) this.paths(OP_FIXDIR, this.dirs[i]!);
    const err = await this.close(false);
    if (err) throw err;
  }

  /** `finish` of a tree done entirely in-thread. */
  finishInThread(): void {
    if (this.error === undefined) {
      for (let i = this.dirs.length - 1; i >= 0; i--) {
        const p = this.dirs[i]!;
        try {
          fs.chmodSync(p, 0o555);
          fs.utimesSync(p, 1, 1);
        } catch (e) {
          this.fail(e);
          break;
        }
      }
    }
    this.closeFds();
    if (this.error !== undefined) throw this.error;
  }

  /** Post what is queued (or drop it) and wait until the worker has closed this job's files. */
  private close(drop: boolean): Promise<NarRestoreError | undefined> {
    if (this.done) return Promise.resolve(this.error);
    return new Promise((resolve) => {
      this.finished = resolve;
      if (drop) {
        this.nops = 0;
        this.data = null;
        this.dataLen = 0;
      }
      this.flush(true);
    });
  }

  /** Remove everything created (directories made writable first); nothing if even the top-level node was not made. */
  async removeAll(): Promise<void> {
    this.closeFds();
    if (this.sync) return this.removeAllInThread();
    await this.close(true);
    if (!this.created) return;
    for (const d of this.dirs) await new Promise<void>((res) => fs.chmod(d, 0o700, () => res()));
    await fs.promises.rm(this.root, { recursive: true, force: true });
  }

  /** `removeAll` of a tree done entirely in-thread (a few nodes at most). */
  removeAllInThread(): void {
    this.closeFds();
    if (!this.created) return;
    for (const d of this.dirs) {
      try {
        fs.chmodSync(d, 0o700);
      } catch {}
    }
    fs.rmSync(this.root, { recursive: true, force: true });
  }
}

/** Reads and checks one NAR from a WireReader, hashing the exact bytes and optionally extracting it. */
class NarParser {
  private readonly start: number;
  private readonly hash = createHash('sha256');
  /** Allocated on first use, no bigger than the NAR can be; reused unless `onChunk` was handed its bytes. */
  private stage: Buffer | null = null;
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
    const b = this.stage!.subarray(0, this.stageLen);
    this.stageLen = 0;
    this.hash.update(b);
    if (this.onChunk) {
      this.onChunk(b);
      this.stage = null; // the consumer may keep those bytes
    }
  }

  private account(b: Buffer): void {
    if (b.length <= 4096) {
      if (this.stage !== null && this.stageLen + b.length > this.stage.length) this.flushStage();
      this.stage ??= Buffer.allocUnsafe(Math.max(4096, Math.min(STAGE, this.lim.maxSize)));
      b.copy(this.stage, this.stageLen);
      this.stageLen += b.length;
    } else {
      this.flushStage();
      this.hash.update(b);
      this.onChunk?.(b);
    }
  }

  // Fast paths: when a token (or run of tokens) is entirely buffered and valid, consume it synchronously. Otherwise
  // they consume nothing and the slow path (which reads, waits and reports errors) takes over at the same position.

  /** Consume `seq` if it comes next. */
  private fastSeq(seq: Buffer): boolean {
    const b = this.r.peekBuffered();
    const n = seq.length;
    if (b.length < n || seq.compare(b, 0, n, 0, n) !== 0 || this.pos + n > this.lim.maxSize) return false;
    this.r.consume(n);
    this.account(b.subarray(0, n));
    return true;
  }

  /** A u64 below 2^32. */
  private fastU64(): number | undefined {
    const b = this.r.peekBuffered();
    if (b.length < 8 || b.readUInt32LE(4) !== 0 || this.pos + 8 > this.lim.maxSize) return undefined;
    this.r.consume(8);
    this.account(b.subarray(0, 8));
    return b.readUInt32LE(0);
  }

  /** A string token of at most `max` bytes with zero padding. */
  private fastStr(max: number): Buffer | undefined {
    const b = this.r.peekBuffered();
    if (b.length < 8) return undefined;
    const len = b.readUInt32LE(0);
    if (b.readUInt32LE(4) !== 0 || len > max) return undefined;
    const end = 8 + len;
    const total = end + padLen(len);
    if (b.length < total || this.pos + total > this.lim.maxSize) return undefined;
    for (let i = end; i < total; i++) if (b[i] !== 0) return undefined;
    this.r.consume(total);
    this.account(b.subarray(0, total));
    return b.subarray(8, end);
  }

  /** `len` bytes of padding then ")". */
  private fastPadClose(len: number): boolean {
    const b = this.r.peekBuffered();
    const p = padLen(len);
    const n = p + 16;
    if (b.length < n || this.pos + n > this.lim.maxSize) return false;
    for (let i = 0; i < p; i++) if (b[i] !== 0) return false;
    if (T_CLOSE.compare(b, p, n) !== 0) return false;
    this.r.consume(n);
    this.account(b.subarray(0, n));
    return true;
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
    if (!this.fastSeq(S_OPEN_TYPE)) {
      await this.expect('(');
      await this.expect('type');
    }
    if (this.fastSeq(S_REGULAR)) return this.contents(path, false);
    if (this.fastSeq(S_EXECUTABLE)) return this.contents(path, true);
    if (this.fastSeq(S_SYMLINK)) return this.target(path);
    if (this.fastSeq(T_DIRECTORY)) return this.directory(path, depth);
    const at = this.pos;
    const type = await this.keyword('"regular", "symlink" or "directory"');
    if (type === 'regular') return this.regular(path);
    if (type === 'symlink') {
      await this.expect('target');
      return this.target(path);
    }
    if (type === 'directory') return this.directory(path, depth);
    throw new NarError(
      `expected "regular", "symlink" or "directory", got ${showBytes(Buffer.from(type, 'latin1'))}`,
      at,
    );
  }

  /** After `regular` (slow path): the optional executable marker and `contents`. */
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
    return this.contents(path, executable);
  }

  /** After `contents`: the file's length, bytes, padding and the closing ")". */
  private async contents(path: Buffer | null, executable: boolean): Promise<void> {
    const at = this.pos;
    const len = this.fastU64() ?? (await this.u64('length of file contents'));
    if (len > this.lim.maxFileSize) {
      throw new NarError(`file is too large (${len} bytes, at most ${this.lim.maxFileSize} allowed)`, at);
    }
    // The contents, their padding and at least the closing ")" must fit.
    if (this.pos + len + padLen(len) + 16 > this.lim.maxSize) {
      throw new NarError(`file of ${len} bytes does not fit in the NAR size limit of ${this.lim.maxSize} bytes`, at);
    }
    const file = this.ex && path ? this.ex.open(path, executable, len) : 0;
    let left = len;
    while (left > 0) {
      let c: Buffer;
      const avail = this.r.buffered;
      if (avail > 0) {
        const n = Math.min(left, avail, READ_CHUNK);
        c = this.r.peekBuffered().subarray(0, n);
        this.r.consume(n);
      } else {
        this.checkAbort();
        try {
          c = await this.r.readSome(Math.min(left, READ_CHUNK), 'file contents');
        } catch (e) {
          if (isEof(e)) throw this.truncated(`file contents (${left} of ${len} bytes missing)`);
          throw e;
        }
      }
      left -= c.length;
      this.account(c);
      if (file && this.ex) {
        this.ex.write(file, c);
        if (this.ex.busy()) await this.ex.wait();
        this.checkEx();
      }
    }
    if (file && this.ex) {
      this.ex.end(file, executable);
      if (this.ex.busy()) await this.ex.wait();
      this.checkEx();
    }
    if (!this.fastPadClose(len)) {
      await this.padding(len, 'file contents');
      await this.expect(')');
    }
  }

  /** After `target`: the symlink's target and the closing ")". */
  private async target(path: Buffer | null): Promise<void> {
    const at = this.pos;
    const target =
      this.fastStr(this.lim.maxTargetLength) ??
      (await this.str(
        'symlink target',
        this.lim.maxTargetLength,
        (len) => `symlink target is too long (${len} bytes, at most ${this.lim.maxTargetLength} allowed)`,
      ));
    if (target.length === 0) throw new NarError('symlink target is empty', at);
    if (target.includes(0)) throw new NarError(`symlink target ${showBytes(target)} contains a NUL byte`, at);
    if (this.ex && path) this.ex.symlink(path, target);
    if (!this.fastSeq(T_CLOSE)) await this.expect(')');
  }

  private async directory(path: Buffer | null, depth: number): Promise<void> {
    if (this.ex && path) this.ex.mkdir(path);
    let prev: Buffer | null = null;
    for (;;) {
      this.checkAbort();
      const at = this.pos;
      const fast = this.fastSeq(S_ENTRY);
      if (!fast) {
        if (this.fastSeq(T_CLOSE)) return;
        const kw = await this.keyword('"entry" or ")"');
        if (kw === ')') return;
        if (kw !== 'entry') {
          throw new NarError(`expected "entry" or ")", got ${showBytes(Buffer.from(kw, 'latin1'))}`, at);
        }
      }
      if (depth + 1 > this.lim.maxDepth) {
        throw new NarError(`directories are nested too deeply (more than ${this.lim.maxDepth} levels)`, at);
      }
      if (!fast) {
        await this.expect('(');
        await this.expect('name');
      }
      const nameAt = this.pos;
      const name =
        this.fastStr(this.lim.maxNameLength) ??
        (await this.str(
          'entry name',
          this.lim.maxNameLength,
          (len) => `entry name is too long (${len} bytes, at most ${this.lim.maxNameLength} allowed)`,
        ));
      checkName(name, nameAt);
      if (prev !== null) {
        const c = Buffer.compare(prev, name);
        if (c === 0) throw new NarError(`duplicate entry name ${showBytes(name)}`, nameAt);
        if (c > 0) {
          throw new NarError(`entry names are not sorted: ${showBytes(name)} comes after ${showBytes(prev)}`, nameAt);
        }
      }
      prev = name;
      if (!this.fastSeq(T_NODE)) await this.expect('node');
      await this.node(this.ex && path ? joinPath(path, name) : null, depth + 1);
      if (!this.fastSeq(T_CLOSE)) await this.expect(')');
      // Trees of empty files, directories or symlinks queue operations too: bound them like file contents.
      if (this.ex?.busy()) await this.ex.wait();
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
 * complete and valid (unless `direct`), with canonical store metadata (files 0444 / 0555, directories 0555, mtime 1).
 * On any failure nothing is left behind.
 */
export async function restoreNar(reader: WireReader, dest: string, opts: RestoreOptions = {}): Promise<NarSummary> {
  const direct = opts.direct === true;
  if (!direct && lexists(dest)) throw new Error(`cannot restore a NAR to ${dest}: it already exists`);
  const tmp = direct ? dest : `${dest}.tmp-${randomHex(8)}`;
  const ex = new Extractor(dest, tmp);
  const p = new NarParser(reader, opts, ex, opts.drainOnIoError ?? false);
  try {
    const res = await p.parse();
    if (opts.expectEnd) await p.expectEnd();
    if (ex.inThread) {
      // A small tree, made in-thread: finish it the same way, without a round trip through the thread pool.
      ex.finishInThread();
      if (direct) return res;
      if (lexists(dest)) throw new Error(`cannot restore a NAR to ${dest}: it appeared while the NAR was being read`);
      try {
        fs.renameSync(tmp, dest);
      } catch (e) {
        throw ex.wrap(e);
      }
      return res;
    }
    await ex.finish();
    if (direct) return res;
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

/**
 * The contents of a NAR (already validated, e.g. a store's small object kept in memory or a database) whose
 * top-level node is a regular file; undefined for a directory or symlink NAR. The contents are a view into `nar`.
 */
export function narRegularFile(nar: Buffer): { executable: boolean; contents: Buffer } | undefined {
  const head = MAGIC.length + S_OPEN_TYPE.length;
  if (nar.length < head || !nar.subarray(0, MAGIC.length).equals(MAGIC)) throw new NarError('not a NAR', 0);
  const rest = nar.subarray(head);
  let executable: boolean;
  if (startsWith(rest, S_REGULAR)) executable = false;
  else if (startsWith(rest, S_EXECUTABLE)) executable = true;
  else return undefined;
  const at = head + (executable ? S_EXECUTABLE : S_REGULAR).length;
  if (nar.length < at + 8) throw new NarError('truncated NAR', nar.length);
  const len = Number(nar.readBigUInt64LE(at));
  const end = at + 8 + len;
  if (end + padLen(len) + T_CLOSE.length !== nar.length) throw new NarError('malformed single-file NAR', at);
  return { executable, contents: nar.subarray(at + 8, end) };
}

function startsWith(b: Buffer, prefix: Buffer): boolean {
  return b.length >= prefix.length && b.subarray(0, prefix.length).equals(prefix);
}
