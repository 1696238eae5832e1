/**
 * Nix wire primitives (spec §1): little-endian u64 numbers, length-prefixed zero-padded byte strings, lists of them,
 * and framed streams. `WireReader` pulls from any async byte source with backpressure (it asks for the next chunk only
 * when it needs more bytes); `WireWriter` batches small writes and honours the sink's backpressure.
 */
import { finished, Readable, type Writable } from 'node:stream';

export class WireError extends Error {
  constructor(
    message: string,
    readonly offset?: number,
  ) {
    super(offset === undefined ? message : `${message} (at byte ${offset})`);
    this.name = 'WireError';
  }
}

/** Upper bounds for anything read from a peer. Every length is checked before memory is allocated for it. */
export interface WireLimits {
  /** Longest byte string (store paths, hashes, env values, log lines…). */
  maxString: number;
  /** Most elements in one list. */
  maxList: number;
}

export const DEFAULT_LIMITS: WireLimits = { maxString: 64 * 1024 * 1024, maxList: 1_000_000 };

const EMPTY = Buffer.alloc(0);
const TWO_POW_53 = 2 ** 53;

export type ByteSource = AsyncIterable<Buffer | Uint8Array | string>;

export class WireReader {
  private readonly it: AsyncIterator<Buffer | Uint8Array | string>;
  private buf: Buffer = EMPTY;
  private pos = 0;
  private ended = false;
  /** Bytes consumed by the protocol so far. */
  offset = 0;
  readonly limits: WireLimits;

  constructor(source: ByteSource, limits: Partial<WireLimits> = {}) {
    this.it = source instanceof Readable ? readableChunks(source) : source[Symbol.asyncIterator]();
    this.limits = { ...DEFAULT_LIMITS, ...limits };
  }

  /** Bytes already received and not yet consumed. */
  get buffered(): number {
    return this.buf.length - this.pos;
  }

  private async fill(): Promise<boolean> {
    if (this.ended) return false;
    for (;;) {
      const r = await this.it.next();
      if (r.done) {
        this.ended = true;
        return false;
      }
      const v = r.value;
      const chunk =
        typeof v === 'string'
          ? Buffer.from(v)
          : Buffer.isBuffer(v)
            ? v
            : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
      if (chunk.length === 0) continue;
      if (this.pos >= this.buf.length) {
        this.buf = chunk;
      } else {
        this.buf = Buffer.concat([this.buf.subarray(this.pos), chunk]);
      }
      this.pos = 0;
      return true;
    }
  }

  /** True when the source ended cleanly with nothing left to read (e.g. between commands). */
  async atEof(): Promise<boolean> {
    if (this.buffered > 0) return false;
    return !(await this.fill());
  }

  /** Exactly `n` bytes; a short stream is an error naming what was being read. */
  async readExact(n: number, what = 'data'): Promise<Buffer> {
    while (this.buffered < n) {
      if (!(await this.fill())) {
        throw new WireError(
          `unexpected end of stream while reading ${what} (${n} bytes wanted, ${this.buffered} left)`,
          this.offset,
        );
      }
    }
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    this.offset += n;
    return out;
  }

  /** Up to `max` bytes (at least 1) of whatever is available; for streaming large payloads without buffering them. */
  async readSome(max: number, what = 'data'): Promise<Buffer> {
    if (this.buffered === 0 && !(await this.fill())) {
      throw new WireError(`unexpected end of stream while reading ${what}`, this.offset);
    }
    const n = Math.min(max, this.buffered);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    this.offset += n;
    return out;
  }

  /**
   * The bytes received and not yet consumed, without consuming them (possibly none). With `consume`, a synchronous
   * fast path for parsers of many small tokens (NAR); the view is valid until the next read.
   */
  peekBuffered(): Buffer {
    return this.buf.subarray(this.pos);
  }

  /** Consume `n` bytes that are already buffered. */
  consume(n: number): void {
    if (n > this.buffered) throw new RangeError(`cannot consume ${n} bytes, only ${this.buffered} are buffered`);
    this.pos += n;
    this.offset += n;
  }

  /** A u64 as a JS number; values ≥ 2^53 are refused rather than silently rounded. */
  async readU64(what = 'number'): Promise<number> {
    const b = await this.readExact(8, what);
    const lo = b.readUInt32LE(0);
    const hi = b.readUInt32LE(4);
    const v = hi * 0x1_0000_0000 + lo;
    if (v >= TWO_POW_53) throw new WireError(`${what} is too large (${b.readBigUInt64LE(0)})`, this.offset - 8);
    return v;
  }

  async readBigU64(what = 'number'): Promise<bigint> {
    const b = await this.readExact(8, what);
    return b.readBigUInt64LE(0);
  }

  async readBool(what = 'boolean'): Promise<boolean> {
    const v = await this.readU64(what);
    if (v !== 0 && v !== 1) throw new WireError(`${what} must be 0 or 1, got ${v}`, this.offset - 8);
    return v === 1;
  }

  /** A length-prefixed, zero-padded byte string of at most `max` bytes. */
  async readBytes(what = 'string', max = this.limits.maxString): Promise<Buffer> {
    const start = this.offset;
    const len = await this.readU64(`length of ${what}`);
    if (len > max) throw new WireError(`${what} is too long (${len} bytes, at most ${max} allowed)`, start);
    const data = await this.readExact(len, what);
    const pad = (8 - (len % 8)) % 8;
    if (pad > 0) {
      const p = await this.readExact(pad, `padding of ${what}`);
      for (let i = 0; i < pad; i++) {
        if (p[i] !== 0) throw new WireError(`non-zero padding after ${what}`, this.offset - pad);
      }
    }
    return data;
  }

  async readString(what = 'string', max = this.limits.maxString): Promise<string> {
    return (await this.readBytes(what, max)).toString('utf8');
  }

  /** Consume a string token and check it equals `expected`. */
  async expectString(expected: string, what = `"${expected}"`): Promise<void> {
    const start = this.offset;
    const got = await this.readBytes(what, Math.max(expected.length, 64));
    if (got.toString('latin1') !== expected) {
      throw new WireError(`expected ${what}, got ${JSON.stringify(got.toString('latin1').slice(0, 64))}`, start);
    }
  }

  async readCount(what = 'list', max = this.limits.maxList): Promise<number> {
    const start = this.offset;
    const n = await this.readU64(`count of ${what}`);
    if (n > max) throw new WireError(`${what} has too many elements (${n}, at most ${max} allowed)`, start);
    return n;
  }

  async readStrings(what = 'list', maxLen = this.limits.maxString, maxCount = this.limits.maxList): Promise<string[]> {
    const n = await this.readCount(what, maxCount);
    const out: string[] = [];
    for (let i = 0; i < n; i++) out.push(await this.readString(`element of ${what}`, maxLen));
    return out;
  }

  /** Skip `n` bytes without keeping them. */
  async skip(n: number, what = 'data'): Promise<void> {
    let left = n;
    while (left > 0) {
      const c = await this.readSome(Math.min(left, 1 << 20), what);
      left -= c.length;
    }
  }
}

/**
 * The chunks of a Readable as they arrive. Unlike a Readable's own async iterator it never concatenates what is
 * buffered (that iterator's `read()` copies every byte of an upload once more), and it never destroys the stream at
 * the end, which for an SSH channel or socket would also close the sending side before the reply and exit status are
 * out. Backpressure: the stream is paused while more than `highWater` bytes wait unread. A stream that closes
 * without ending is an error (as with the built-in iterator).
 */
export function readableChunks(stream: Readable, highWater = 1024 * 1024): AsyncIterator<Buffer | string> {
  const queue: Array<Buffer | string> = [];
  let head = 0;
  let queued = 0;
  let done = false;
  let error: Error | null = null;
  let wake: (() => void) | null = null;
  const notify = () => {
    const w = wake;
    wake = null;
    w?.();
  };
  stream.on('data', (c: Buffer | string) => {
    queue.push(c);
    queued += c.length;
    if (queued > highWater) stream.pause();
    notify();
  });
  finished(stream, { writable: false }, (err) => {
    if (err) error = err;
    done = true;
    notify();
  });
  return {
    async next(): Promise<IteratorResult<Buffer | string>> {
      for (;;) {
        if (head < queue.length) {
          const c = queue[head]!;
          queue[head++] = '';
          if (head > 1024 && head * 2 > queue.length) {
            queue.splice(0, head);
            head = 0;
          }
          queued -= c.length;
          if (queued <= highWater && stream.isPaused() && !done) stream.resume();
          return { value: c, done: false };
        }
        if (error) throw error;
        if (done) return { value: undefined, done: true };
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
      }
    },
  };
}

/** Reads a framed stream (spec §1.4) as a byte source: u64 length + bytes, terminated by a zero-length frame. */
export async function* framedSource(r: WireReader, maxFrame = 64 * 1024 * 1024): AsyncGenerator<Buffer> {
  for (;;) {
    const start = r.offset;
    const len = await r.readU64('frame length');
    if (len === 0) return;
    if (len > maxFrame) throw new WireError(`frame too large (${len} bytes)`, start);
    let left = len;
    while (left > 0) {
      const c = await r.readSome(left, 'frame');
      left -= c.length;
      yield c;
    }
  }
}

/** Drain the rest of a framed stream, e.g. after a failure part-way, so the connection stays in sync. */
export async function drainFramed(gen: AsyncGenerator<Buffer>): Promise<void> {
  for (;;) {
    const r = await gen.next();
    if (r.done) return;
  }
}

export function padLength(len: number): number {
  return (8 - (len % 8)) % 8;
}

export function encodeU64(v: number | bigint): Buffer {
  const b = Buffer.allocUnsafe(8);
  if (typeof v === 'bigint') b.writeBigUInt64LE(v);
  else {
    if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`cannot encode ${v} as u64`);
    b.writeUInt32LE(v % 0x1_0000_0000, 0);
    b.writeUInt32LE(Math.floor(v / 0x1_0000_0000), 4);
  }
  return b;
}

export function encodeString(s: string | Uint8Array): Buffer {
  const data = typeof s === 'string' ? Buffer.from(s) : Buffer.from(s.buffer, s.byteOffset, s.byteLength);
  const pad = padLength(data.length);
  const out = Buffer.allocUnsafe(8 + data.length + pad);
  out.writeUInt32LE(data.length % 0x1_0000_0000, 0);
  out.writeUInt32LE(Math.floor(data.length / 0x1_0000_0000), 4);
  data.copy(out, 8);
  out.fill(0, 8 + data.length);
  return out;
}

/**
 * Buffers protocol output and writes it to a stream. Small values are batched; large payloads are passed through.
 * `flush()` waits for the sink to drain, so a slow client applies backpressure to whatever produces the data.
 */
export class WireWriter {
  private chunks: Buffer[] = [];
  private size = 0;
  /** Bytes handed to the sink so far. */
  written = 0;
  private closedError: Error | undefined;

  constructor(
    private readonly sink: Writable,
    private readonly batch = 64 * 1024,
  ) {
    sink.on('error', (e: Error) => {
      this.closedError = e;
    });
    sink.on('close', () => {
      this.closedError ??= new WireError('connection closed');
    });
  }

  private push(b: Buffer): void {
    this.chunks.push(b);
    this.size += b.length;
  }

  u64(v: number | bigint): this {
    this.push(encodeU64(v));
    return this;
  }

  bool(v: boolean): this {
    return this.u64(v ? 1 : 0);
  }

  string(s: string | Uint8Array): this {
    this.push(encodeString(s));
    return this;
  }

  strings(list: Iterable<string | Uint8Array>): this {
    const arr = [...list];
    this.u64(arr.length);
    for (const s of arr) this.string(s);
    return this;
  }

  /** Raw bytes with no length prefix (NAR payloads). */
  raw(b: Buffer): this {
    if (b.length > 0) this.push(b);
    return this;
  }

  /** Write out what is buffered if it exceeds the batch size; waits for drain when the sink is full. */
  async maybeFlush(): Promise<void> {
    if (this.size >= this.batch) await this.flush();
  }

  async flush(): Promise<void> {
    if (this.closedError) throw this.closedError;
    if (this.size === 0) return;
    const data = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.size);
    this.chunks = [];
    this.size = 0;
    this.written += data.length;
    if (!this.sink.write(data)) await waitDrain(this.sink);
    if (this.closedError) throw this.closedError;
  }

  /**
   * Write `chunk` (raw, after whatever is batched) without copying it, and resolve only when the sink is done with it
   * (its write callback), so that the caller may then reuse its memory, e.g. a lent NAR chunk (`dumpPath` with
   * `recycle`). The sink's own pace is the backpressure.
   */
  async writeBorrowed(chunk: Buffer): Promise<void> {
    if (this.size > 0 && this.size + chunk.length <= this.batch) {
      this.push(chunk); // small: copied into the batch, and the chunk is free at once
      await this.flush();
      return;
    }
    await this.flush();
    if (chunk.length === 0) return;
    this.written += chunk.length;
    const sink = this.sink;
    await new Promise<void>((resolve, reject) => {
      let settled = false;
      // A sink that closes may never call back for a write it still held (ssh2 waiting for window): settle on close.
      const done = (err?: Error | null) => {
        if (settled) return;
        settled = true;
        sink.off('close', onClose);
        sink.off('error', done);
        if (err) reject(this.closedError ?? err);
        else resolve();
      };
      const onClose = () => done(new WireError('connection closed'));
      sink.once('close', onClose);
      sink.once('error', done);
      sink.write(chunk, done);
    });
    if (this.closedError) throw this.closedError;
  }
}

export function waitDrain(sink: Writable): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const done = () => {
      sink.off('drain', done);
      sink.off('close', onClose);
      sink.off('error', onErr);
      resolve();
    };
    const onClose = () => {
      sink.off('drain', done);
      sink.off('error', onErr);
      reject(new WireError('connection closed'));
    };
    const onErr = (e: Error) => {
      sink.off('drain', done);
      sink.off('close', onClose);
      reject(e);
    };
    sink.once('drain', done);
    sink.once('close', onClose);
    sink.once('error', onErr);
  });
}

/** Exactly the next `n` bytes of `r` as a byte source (e.g. the `narSize` bytes of a serve-protocol upload). */
export async function* limitedSource(r: WireReader, n: number, what = 'data'): AsyncGenerator<Buffer> {
  let left = n;
  while (left > 0) {
    const c = await r.readSome(Math.min(left, 1 << 20), what);
    left -= c.length;
    yield c;
  }
}
