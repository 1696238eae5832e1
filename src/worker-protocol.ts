/**
 * The worker protocol (`ssh-ng://`, `nix-daemon --stdio`; spec §3). Clients from 1.10 up are accepted and
 * everything is serialised for `v = min(client, 1.38)`. Thin: operations are decoded with `wire`, answered from the
 * session's store view, builder and `realise`, and encoded back; messages travel on the stderr channel (§1.6) with
 * build activities for ≥ 1.20.
 *
 * Trust: every client is reported as *not trusted* (trusted flag 2). Unsigned uploads are still accepted, into the
 * user's own scope (the store decides what may become public). Settings an untrusted client may not set are ignored.
 *
 * Errors: a failure while an operation's arguments are read (bad store path, over-long string, unknown operation…)
 * is answered with `STDERR_ERROR` and ends the session, since the rest of the request cannot be trusted to be in
 * sync; a failure while the operation runs is answered with `STDERR_ERROR` and the session goes on. Framed uploads
 * are always consumed through their terminating frame first (§1.4).
 */
import { open, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { Writable } from 'node:stream';
import type { BuildResult } from './build.js';
import { type BasicDerivation, drvNameFromPath, readBasicDerivation } from './derivation.js';
import { Hash, HashSink } from './hash.js';
import { dumpPath, narHashPath } from './nar.js';
import {
  type BuildLogSink,
  type DerivedPath,
  derivationOutputMap,
  isSuccessStatus,
  type KeyedBuildResult,
  parseDerivedPath,
  queryMissing,
  realise,
} from './realise.js';
import type { Session } from './session.js';
import type { NewPathInfo, PathInfo } from './store.js';
import {
  type ContentAddressMethod,
  makeFixedOutputPath,
  makeTextPath,
  nameError,
  parseContentAddressMethod,
  renderContentAddress,
  StorePath,
} from './store-path.js';
import { VERSION } from './version.js';
import { type ByteSource, WireError, WireReader, WireWriter } from './wire.js';

export const WORKER_MAGIC_1 = 0x6e697863;
export const WORKER_MAGIC_2 = 0x6478696f;
/** 1.38: the newest version the spec documents (Nix 2.24–2.34). */
export const WORKER_PROTOCOL_VERSION = 0x126;
/** The oldest client a Nix daemon accepts. */
export const MIN_CLIENT_VERSION = 0x10a;
/** Shown by `nix store info` / `nix store ping` as the daemon's version. */
export const NIX_VERSION_STRING = `2.26.0 (buildbox ${VERSION})`;
/** Handshake trusted flag (≥ 1.35): 0 unknown, 1 trusted, 2 not trusted. */
export const TRUSTED_FLAG = 2;

export const STDERR_NEXT = 0x6f6c6d67;
export const STDERR_READ = 0x64617461;
export const STDERR_WRITE = 0x64617416;
export const STDERR_LAST = 0x616c7473;
export const STDERR_ERROR = 0x63787470;
export const STDERR_START_ACTIVITY = 0x53545254;
export const STDERR_STOP_ACTIVITY = 0x53544f50;
export const STDERR_RESULT = 0x52534c54;

export const ActivityType = { Build: 105 } as const;
export const ResultType = { BuildLogLine: 101 } as const;
const LVL_INFO = 3;

export enum WorkerOp {
  IsValidPath = 1,
  HasSubstitutes = 3,
  QueryPathHash = 4,
  QueryReferences = 5,
  QueryReferrers = 6,
  AddToStore = 7,
  AddTextToStore = 8,
  BuildPaths = 9,
  EnsurePath = 10,
  AddTempRoot = 11,
  AddIndirectRoot = 12,
  SyncWithGC = 13,
  FindRoots = 14,
  ExportPath = 16,
  QueryDeriver = 18,
  SetOptions = 19,
  CollectGarbage = 20,
  QuerySubstitutablePathInfo = 21,
  QueryDerivationOutputs = 22,
  QueryAllValidPaths = 23,
  QueryFailedPaths = 24,
  ClearFailedPaths = 25,
  QueryPathInfo = 26,
  ImportPaths = 27,
  QueryDerivationOutputNames = 28,
  QueryPathFromHashPart = 29,
  QuerySubstitutablePathInfos = 30,
  QueryValidPaths = 31,
  QuerySubstitutablePaths = 32,
  QueryValidDerivers = 33,
  OptimiseStore = 34,
  VerifyStore = 35,
  BuildDerivation = 36,
  AddSignatures = 37,
  NarFromPath = 38,
  AddToStoreNar = 39,
  QueryMissing = 40,
  QueryDerivationOutputMap = 41,
  RegisterDrvOutput = 42,
  QueryRealisation = 43,
  AddMultipleToStore = 44,
  AddBuildLog = 45,
  BuildPathsWithResults = 46,
  AddPermRoot = 47,
}

export function opName(op: number): string {
  return (WorkerOp as unknown as Record<number, string | undefined>)[op] ?? 'unknown';
}

/** Longest store path (or hash part, signature…) accepted; bounded before allocation. */
const MAX_PATH = 4096;
const MAX_PATHS = 1_000_000;
const MAX_SIG = 1024;
const MAX_SIGS = 1024;
const MAX_CA = 1024;
/** Longest frame of a framed stream (clients send ≤ 32 KiB; a single large write may make one bigger). */
const MAX_FRAME = 64 * 1024 * 1024;
/** A partial log line is sent as a line of its own when it grows this long. */
const MAX_LOG_LINE = 64 * 1024;

export interface WorkerStats {
  operations: number;
  bytesIn: number;
  bytesOut: number;
  clientVersion: number;
}

export interface WorkerIO {
  input: ByteSource;
  output: Writable;
}

/** A failure the client should see; the session goes on if the request was fully read. */
export class WorkerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'WorkerError';
  }
}

/** The byte streams are out of sync (or gone): report if possible, then end the session. */
class ConnectionBroken extends Error {
  constructor(
    message: string,
    readonly report = true,
  ) {
    super(message);
    this.name = 'ConnectionBroken';
  }
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Run one worker-protocol session to its end; resolves with the exit status to send. */
export async function runWorker(session: Session, io: WorkerIO, stats?: WorkerStats): Promise<number> {
  const st: WorkerStats = stats ?? { operations: 0, bytesIn: 0, bytesOut: 0, clientVersion: 0 };
  const conn = new WorkerConnection(session, io, st);
  try {
    return await conn.run();
  } finally {
    st.bytesIn = conn.r.offset;
    st.bytesOut = conn.w.written;
    session.store.releaseTempRoots(session.id);
  }
}

type Reply = (w: WireWriter) => void | Promise<void>;
type LogField = number | string | Buffer;

/** The stderr channel (§1.6): log messages, activities and errors, encoded for the negotiated version. */
class LogChannel {
  private seq = 0;
  private flushing: Promise<void> | null = null;
  private again = false;
  private failed: unknown;

  constructor(
    private readonly w: WireWriter,
    private readonly minor: () => number,
  ) {}

  /** Flush in the background (log callbacks are synchronous); ordering is kept by the single writer buffer. */
  private kick(): void {
    if (this.flushing) {
      this.again = true;
      return;
    }
    this.flushing = (async () => {
      try {
        do {
          this.again = false;
          await this.w.flush();
        } while (this.again);
      } catch (e) {
        this.failed = e;
      } finally {
        this.flushing = null;
      }
    })();
  }

  /** Wait for background flushes; rethrows a write failure. */
  async settle(): Promise<void> {
    while (this.flushing) await this.flushing;
    if (this.failed !== undefined) throw new ConnectionBroken(errorMessage(this.failed), false);
  }

  next(msg: string | Buffer): void {
    this.w.u64(STDERR_NEXT).string(msg);
    this.kick();
  }

  private fields(fields: LogField[]): void {
    this.w.u64(fields.length);
    for (const f of fields) {
      if (typeof f === 'number') this.w.u64(0).u64(f);
      else this.w.u64(1).string(f);
    }
  }

  /** Start an activity; returns its id, or null when the client is too old for activities (< 1.20). */
  startActivity(type: number, text: string, fields: LogField[], level = LVL_INFO): bigint | null {
    if (this.minor() < 20) {
      this.next(`${text}\n`);
      return null;
    }
    const id = (BigInt(process.pid) << 32n) | BigInt(++this.seq);
    this.w.u64(STDERR_START_ACTIVITY).u64(id).u64(level).u64(type).string(text);
    this.fields(fields);
    this.w.u64(0); // parent: none
    this.kick();
    return id;
  }

  result(id: bigint, type: number, fields: LogField[]): void {
    this.w.u64(STDERR_RESULT).u64(id).u64(type);
    this.fields(fields);
    this.kick();
  }

  stopActivity(id: bigint): void {
    this.w.u64(STDERR_STOP_ACTIVITY).u64(id);
    this.kick();
  }

  /** `STDERR_ERROR` in the form the client reads (structured from 1.26). */
  error(msg: string): void {
    if (this.minor() >= 26) {
      this.w.u64(STDERR_ERROR).string('Error').u64(0).string('Error').string(msg).u64(0).u64(0);
    } else {
      this.w.u64(STDERR_ERROR).string(msg).u64(1);
    }
  }

  /** The log of one build: an activity of type 105 whose output lines are results of type 101. */
  build(drvPath: string): BuildLogSink {
    const id = this.startActivity(ActivityType.Build, `building '${drvPath}'`, [drvPath, '', 1, 1]);
    let partial: Buffer[] = [];
    let partialLen = 0;
    const line = (b: Buffer) => {
      if (id === null) this.next(Buffer.concat([b, Buffer.from('\n')]));
      else this.result(id, ResultType.BuildLogLine, [b]);
    };
    const flushPartial = () => {
      if (partialLen > 0) line(Buffer.concat(partial, partialLen));
      partial = [];
      partialLen = 0;
    };
    let ended = false;
    return {
      log: (chunk: Buffer) => {
        if (ended) return;
        let start = 0;
        for (;;) {
          const nl = chunk.indexOf(10, start);
          if (nl < 0) break;
          const piece = chunk.subarray(start, nl);
          if (partialLen > 0) {
            partial.push(piece);
            partialLen += piece.length;
            flushPartial();
          } else line(Buffer.from(piece));
          start = nl + 1;
        }
        if (start < chunk.length) {
          const rest = Buffer.from(chunk.subarray(start));
          partial.push(rest);
          partialLen += rest.length;
          if (partialLen >= MAX_LOG_LINE) flushPartial();
        }
      },
      notice: (msg: string) => {
        if (!ended) this.next(`buildbox: ${msg}\n`);
      },
      done: () => {
        if (ended) return;
        ended = true;
        flushPartial();
        if (id !== null) this.stopActivity(id);
      },
    };
  }
}

/**
 * A framed stream (§1.4) read from the connection, with enough state to drain what a consumer left unread, so that
 * a failure part-way leaves the connection in sync. A failure of the framing itself (truncation, over-long frame)
 * cannot be recovered from.
 */
class Framed {
  private left = 0;
  private done = false;
  private broken: Error | undefined;

  constructor(private readonly r: WireReader) {}

  private async nextFrame(): Promise<boolean> {
    const start = this.r.offset;
    let len: number;
    try {
      len = await this.r.readU64('frame length');
    } catch (e) {
      this.broken = e as Error;
      throw e;
    }
    if (len === 0) {
      this.done = true;
      return false;
    }
    if (len > MAX_FRAME) {
      this.broken = new WireError(`frame too large (${len} bytes, at most ${MAX_FRAME} allowed)`, start);
      throw this.broken;
    }
    this.left = len;
    return true;
  }

  private async chunk(max: number): Promise<Buffer> {
    try {
      const c = await this.r.readSome(Math.min(this.left, max), 'frame');
      this.left -= c.length;
      return c;
    } catch (e) {
      this.broken = e as Error;
      throw e;
    }
  }

  /** The payload as a byte source. */
  async *source(): AsyncGenerator<Buffer> {
    for (;;) {
      if (this.broken) throw this.broken;
      if (this.left === 0) {
        if (this.done || !(await this.nextFrame())) return;
        continue;
      }
      yield await this.chunk(1 << 20);
    }
  }

  /** Consume the rest, through the terminating frame; throws ConnectionBroken if the stream cannot be resynced. */
  async finish(): Promise<void> {
    try {
      for (;;) {
        if (this.broken) throw this.broken;
        if (this.left > 0) {
          await this.chunk(1 << 20);
          continue;
        }
        if (this.done || !(await this.nextFrame())) return;
      }
    } catch (e) {
      throw new ConnectionBroken(`reading a framed upload failed: ${errorMessage(e)}`);
    }
  }
}

interface ClientOptions {
  maxSilentTime: number;
  buildTimeout: number;
  maxLogSize: number;
}

class WorkerConnection {
  readonly r: WireReader;
  readonly w: WireWriter;
  private readonly log: LogChannel;
  private minor = 0;
  private readonly storeDir: string;
  private readonly options: ClientOptions = { maxSilentTime: 0, buildTimeout: 0, maxLogSize: 0 };

  constructor(
    private readonly s: Session,
    io: WorkerIO,
    private readonly st: WorkerStats,
  ) {
    this.r = new WireReader(io.input, { maxString: 64 * 1024 * 1024, maxList: MAX_PATHS });
    this.w = new WireWriter(io.output);
    this.log = new LogChannel(this.w, () => this.minor);
    this.storeDir = s.store.storeDir;
  }

  async run(): Promise<number> {
    try {
      if (!(await this.handshake())) return 1;
      await this.loop();
      return 0;
    } catch (e) {
      const msg = errorMessage(e);
      const report = !(e instanceof ConnectionBroken) || e.report;
      if (!this.s.signal.aborted) this.s.logger.warn({ err: msg }, 'worker session failed');
      if (report && !this.s.signal.aborted) {
        try {
          await this.log.settle();
          this.log.error(msg);
          await this.w.flush();
        } catch {
          // the client is gone; nothing more to say
        }
      }
      return 1;
    }
  }

  /** §3.2. False if the peer is not a Nix worker-protocol client (nothing sensible can be sent back). */
  private async handshake(): Promise<boolean> {
    const magic = await this.r.readU64('worker protocol magic');
    if (magic !== WORKER_MAGIC_1) {
      this.s.logger.warn({ magic }, 'not a worker protocol client');
      return false;
    }
    this.w.u64(WORKER_MAGIC_2).u64(WORKER_PROTOCOL_VERSION);
    await this.w.flush();
    const clientVersion = await this.r.readU64('client version');
    this.st.clientVersion = clientVersion;
    if (clientVersion >> 8 !== 1 || clientVersion < MIN_CLIENT_VERSION) {
      this.s.logger.warn({ clientVersion }, 'unsupported worker protocol client version');
      return false;
    }
    this.minor = Math.min(clientVersion, WORKER_PROTOCOL_VERSION) & 0xff;
    if (this.minor >= 38) {
      await this.r.readStrings('client features', 256, 1024); // we offer none, so none are in use
      this.w.strings([]);
      await this.w.flush();
    }
    if (this.minor >= 14) {
      if ((await this.r.readU64('cpu affinity flag')) !== 0) await this.r.readU64('cpu affinity');
    }
    if (this.minor >= 11) await this.r.readU64('reserve space flag');
    if (this.minor >= 33) this.w.string(NIX_VERSION_STRING);
    if (this.minor >= 35) this.w.u64(TRUSTED_FLAG);
    this.w.u64(STDERR_LAST);
    await this.w.flush();
    return true;
  }

  // -------------------------------------------------------------------------------------------------------------
  // Argument readers: any failure here ends the session (after an error message).

  private async readPath(what = 'store path'): Promise<string> {
    const start = this.r.offset;
    const p = await this.r.readString(what, MAX_PATH);
    try {
      StorePath.parse(p, this.storeDir);
    } catch (e) {
      throw new WireError(errorMessage(e), start);
    }
    return p;
  }

  private async readPaths(what = 'store paths'): Promise<string[]> {
    const n = await this.r.readCount(what, MAX_PATHS);
    const out: string[] = [];
    for (let i = 0; i < n; i++) out.push(await this.readPath(`element of ${what}`));
    return out;
  }

  private async readDrvPath(): Promise<string> {
    const start = this.r.offset;
    const p = await this.readPath('derivation path');
    if (!p.endsWith('.drv')) throw new WireError(`'${p}' is not a derivation path`, start);
    return p;
  }

  private async readDerivedPaths(): Promise<DerivedPath[]> {
    const n = await this.r.readCount('derived paths', MAX_PATHS);
    const out: DerivedPath[] = [];
    for (let i = 0; i < n; i++) {
      const start = this.r.offset;
      const s = await this.r.readString('derived path', MAX_PATH + 64 * 1024);
      try {
        out.push(parseDerivedPath(s, this.storeDir, this.minor < 30));
      } catch (e) {
        throw new WireError(errorMessage(e), start);
      }
    }
    return out;
  }

  private async readBuildMode(): Promise<number> {
    const start = this.r.offset;
    const mode = await this.r.readU64('build mode');
    if (mode > 2) throw new WireError(`unknown build mode ${mode}`, start);
    return mode;
  }

  /** ValidPathInfo (§3.5) with all ≥ 16 fields, as in AddToStoreNar and AddMultipleToStore. */
  private async readValidPathInfo(r: WireReader): Promise<NewPathInfo> {
    const pathAt = r.offset;
    const path = await r.readString('store path', MAX_PATH);
    const parse = (p: string, at: number) => {
      try {
        StorePath.parse(p, this.storeDir);
      } catch (e) {
        throw new WireError(errorMessage(e), at);
      }
    };
    parse(path, pathAt);
    const derAt = r.offset;
    const deriver = await r.readString('deriver', MAX_PATH);
    if (deriver !== '') parse(deriver, derAt);
    const hashAt = r.offset;
    const narHashText = await r.readString('NAR hash', 256);
    const nRefs = await r.readCount('references', MAX_PATHS);
    const references: string[] = [];
    for (let i = 0; i < nRefs; i++) {
      const at = r.offset;
      const ref = await r.readString('reference', MAX_PATH);
      parse(ref, at);
      references.push(ref);
    }
    const registrationTime = await r.readU64('registration time');
    const narSize = await r.readU64('NAR size');
    await r.readBool('ultimate flag'); // never taken from a client
    const sigs = await r.readStrings('signatures', MAX_SIG, MAX_SIGS);
    const ca = await r.readString('content address', MAX_CA);
    let narHash: Hash;
    try {
      narHash = Hash.parseAny(narHashText, 'sha256');
    } catch (e) {
      throw new WireError(`bad NAR hash for '${path}': ${errorMessage(e)}`, hashAt);
    }
    if (narHash.algo !== 'sha256') throw new WireError(`NAR hash of '${path}' is not sha256`, hashAt);
    return { path, deriver: deriver || null, narHash, narSize, references, registrationTime, sigs, ca: ca || null };
  }

  // -------------------------------------------------------------------------------------------------------------
  // The log window of one operation

  /**
   * Run an operation whose arguments have been read: its messages, then `STDERR_LAST` and the reply, or
   * `STDERR_ERROR` (the session goes on). A failure while writing the reply ends the session.
   */
  private async work(fn: () => Promise<Reply | undefined> | Reply | undefined): Promise<void> {
    let reply: Reply | undefined;
    try {
      reply = await fn();
    } catch (e) {
      if (e instanceof ConnectionBroken) throw e;
      await this.log.settle();
      this.s.logger.info({ err: errorMessage(e) }, 'worker operation failed');
      this.log.error(errorMessage(e));
      await this.w.flush();
      return;
    }
    await this.log.settle();
    this.w.u64(STDERR_LAST);
    if (reply) {
      try {
        await reply(this.w);
      } catch (e) {
        throw new ConnectionBroken(errorMessage(e), false);
      }
    }
    await this.w.flush();
  }

  private async loop(): Promise<void> {
    for (;;) {
      if (await this.r.atEof()) return;
      const op = await this.r.readU64('operation');
      this.st.operations++;
      try {
        await this.perform(op);
      } catch (e) {
        if (e instanceof ConnectionBroken || e instanceof WorkerError) throw e;
        throw new WorkerError(`${opName(op)}: ${errorMessage(e)}`);
      }
    }
  }

  private async perform(op: number): Promise<void> {
    const s = this.s;
    const store = s.store;
    const user = s.user;
    switch (op) {
      case WorkerOp.IsValidPath: {
        const p = await this.readPath();
        return this.work(() => {
          const valid = store.isValidPath(user, p);
          if (valid) store.addTempRoot(s.id, p);
          return (w) => void w.bool(valid);
        });
      }
      case WorkerOp.QueryValidPaths: {
        const paths = await this.readPaths();
        if (this.minor >= 27) await this.r.readBool('substitute flag'); // the box never substitutes
        return this.work(() => {
          const valid = store.queryValidPaths(user, paths);
          for (const p of valid) store.addTempRoot(s.id, p);
          return (w) => void w.strings(valid);
        });
      }
      case WorkerOp.QueryPathInfo: {
        const p = await this.readPath();
        return this.work(() => {
          const info = store.queryPathInfo(user, p);
          if (!info && this.minor < 17) throw new WorkerError(`path '${p}' is not valid`);
          if (info) store.addTempRoot(s.id, p);
          return (w) => {
            if (this.minor >= 17) w.bool(info !== undefined);
            if (info) this.writeUnkeyedPathInfo(w, info);
          };
        });
      }
      case WorkerOp.QueryPathFromHashPart: {
        const hashPart = await this.r.readString('hash part', 64);
        return this.work(() => {
          const p = store.queryPathFromHashPart(user, hashPart) ?? '';
          return (w) => void w.string(p);
        });
      }
      case WorkerOp.QueryReferrers:
      case WorkerOp.QueryValidDerivers: {
        const p = await this.readPath();
        return this.work(() => {
          let out: string[];
          if (op === WorkerOp.QueryReferrers) out = store.queryReferrers(user, p);
          else {
            const d = store.queryPathInfo(user, p)?.deriver;
            out = d && store.isValidPath(user, d) ? [d] : [];
          }
          return (w) => void w.strings(out);
        });
      }
      case WorkerOp.QuerySubstitutablePaths: {
        await this.readPaths();
        return this.work(() => (w) => void w.strings([]));
      }
      case WorkerOp.QuerySubstitutablePathInfos: {
        if (this.minor >= 22) {
          const n = await this.r.readCount('paths', MAX_PATHS);
          for (let i = 0; i < n; i++) {
            await this.readPath();
            await this.r.readString('content address', MAX_CA);
          }
        } else await this.readPaths();
        return this.work(() => (w) => void w.u64(0));
      }
      case WorkerOp.QueryRealisation: {
        await this.r.readString('derivation output id', 1024);
        // Only content-addressed derivations have realisations of their own; the box does not build those.
        return this.work(() => (w) => void w.strings([]));
      }
      case WorkerOp.QueryDerivationOutputMap: {
        const drvPath = await this.readDrvPath();
        return this.work(() => {
          const map = derivationOutputMap(s, drvPath);
          return (w) => {
            w.u64(map.size);
            for (const [name, path] of map) w.string(name).string(path);
          };
        });
      }
      case WorkerOp.AddTempRoot:
      case WorkerOp.EnsurePath: {
        const p = await this.readPath();
        return this.work(() => {
          if (op === WorkerOp.EnsurePath && !store.isValidPath(user, p)) {
            throw new WorkerError(
              `path '${p}' is not valid on the box, and buildbox does not substitute; copy it to the box first`,
            );
          }
          store.addTempRoot(s.id, p);
          return (w) => void w.u64(1);
        });
      }
      case WorkerOp.SyncWithGC:
        return this.work(() => (w) => void w.u64(1));
      case WorkerOp.SetOptions:
        await this.readSetOptions();
        return this.work(() => undefined);
      case WorkerOp.NarFromPath: {
        const p = await this.readPath();
        return this.work(() => {
          if (!store.isValidPath(user, p)) throw new WorkerError(`path '${p}' is not valid`);
          const nar = store.narFromPath(user, p, { recycle: true });
          return async (w) => {
            await w.flush();
            // Lent chunks: each is written without a copy and handed back once the channel has sent it.
            for await (const chunk of nar) await w.writeBorrowed(chunk);
          };
        });
      }
      case WorkerOp.AddToStoreNar:
        return this.addToStoreNar();
      case WorkerOp.AddMultipleToStore:
        return this.addMultipleToStore();
      case WorkerOp.AddToStore:
        return this.addToStore();
      case WorkerOp.AddSignatures: {
        const p = await this.readPath();
        await this.r.readStrings('signatures', MAX_SIG, MAX_SIGS);
        return this.work(() => {
          throw new WorkerError(
            `buildbox does not add signatures to paths already on the box ('${p}'); ` +
              'upload a path together with its signatures instead',
          );
        });
      }
      case WorkerOp.AddBuildLog: {
        const at = this.r.offset;
        const base = await this.r.readString('derivation base name', MAX_PATH);
        try {
          StorePath.fromBaseName(base);
        } catch (e) {
          throw new WireError(errorMessage(e), at);
        }
        const framed = new Framed(this.r);
        return this.work(async () => {
          await framed.finish();
          throw new WorkerError('buildbox does not keep build logs uploaded by clients (AddBuildLog)');
        });
      }
      case WorkerOp.BuildDerivation:
        return this.buildDerivation();
      case WorkerOp.BuildPaths:
      case WorkerOp.BuildPathsWithResults: {
        if (op === WorkerOp.BuildPathsWithResults && this.minor < 34) {
          throw new WorkerError('BuildPathsWithResults needs worker protocol 1.34');
        }
        const paths = await this.readDerivedPaths();
        const mode = op === WorkerOp.BuildPathsWithResults || this.minor >= 15 ? await this.readBuildMode() : 0;
        return this.work(async () => {
          this.checkBuildMode(mode);
          const results = await this.realise(paths);
          if (op === WorkerOp.BuildPathsWithResults) {
            return (w) => {
              w.u64(results.length);
              for (const k of results) {
                w.string(k.path);
                this.writeBuildResult(w, k.result);
              }
            };
          }
          const failed = results.filter((k) => !isSuccessStatus(k.result.status));
          if (failed.length > 0) throw new WorkerError(failureMessage(failed));
          return (w) => void w.u64(1);
        });
      }
      case WorkerOp.QueryMissing: {
        const paths = await this.readDerivedPaths();
        return this.work(() => {
          const m = queryMissing(s, paths);
          return (w) =>
            void w.strings(m.willBuild).strings(m.willSubstitute).strings(m.unknown).u64(m.downloadSize).u64(m.narSize);
        });
      }
      case WorkerOp.QueryFailedPaths:
      case WorkerOp.ClearFailedPaths:
        throw new WorkerError(`worker operation ${op} (${opName(op)}) was removed from Nix`);
      default:
        throw new WorkerError(`buildbox does not implement worker operation ${op} (${opName(op)})`);
    }
  }

  private async readSetOptions(): Promise<void> {
    const r = this.r;
    await r.readU64('keepFailed');
    await r.readU64('keepGoing');
    await r.readU64('tryFallback');
    await r.readU64('verbosity');
    await r.readU64('maxBuildJobs');
    const maxSilentTime = await r.readU64('maxSilentTime');
    await r.readU64('useBuildHook');
    await r.readU64('verboseBuild');
    await r.readU64('logType');
    await r.readU64('printBuildTrace');
    await r.readU64('buildCores');
    await r.readU64('useSubstitutes');
    this.options.maxSilentTime = maxSilentTime;
    if (this.minor >= 12) {
      const n = await r.readCount('settings overrides', 4096);
      const ignored: string[] = [];
      for (let i = 0; i < n; i++) {
        const name = await r.readString('setting name', 1024);
        const value = await r.readString('setting value', 1024 * 1024);
        // What Nix lets an untrusted client set and that matters for a build here; everything else is ignored.
        const num = /^\d+$/.test(value.trim()) ? Number(value.trim()) : undefined;
        if (name === 'max-silent-time' && num !== undefined) this.options.maxSilentTime = num;
        else if (name === 'build-timeout' && num !== undefined) this.options.buildTimeout = num;
        else ignored.push(name);
      }
      if (ignored.length > 0) this.s.logger.debug({ ignored }, 'ignored settings of an untrusted client');
    }
  }

  private checkBuildMode(mode: number): void {
    if (mode !== 0) {
      throw new WorkerError(
        `${mode === 1 ? 'repairing' : 'checking'} builds is not allowed on buildbox (no client is trusted); ` +
          'build normally instead',
      );
    }
  }

  private realise(paths: DerivedPath[]): Promise<KeyedBuildResult[]> {
    return realise(this.s, paths, {
      options: { ...this.options },
      notice: (msg) => this.log.next(`buildbox: ${msg}\n`),
      startBuild: (drvPath) => this.log.build(drvPath),
    });
  }

  private async buildDerivation(): Promise<void> {
    const drvPath = await this.readDrvPath();
    let drv: BasicDerivation;
    try {
      drv = await readBasicDerivation(this.r, drvNameFromPath(drvPath, this.storeDir), { storeDir: this.storeDir });
    } catch (e) {
      if (e instanceof WireError) throw e;
      throw new WorkerError(`cannot read the derivation sent for '${drvPath}': ${errorMessage(e)}`);
    }
    const mode = await this.readBuildMode();
    return this.work(async () => {
      this.checkBuildMode(mode);
      const sink = this.log.build(drvPath);
      let res: BuildResult;
      try {
        res = await this.s.builder.build({
          user: this.s.user,
          drvPath,
          drv,
          verified: false,
          options: { ...this.options },
          log: (chunk) => sink.log(chunk),
          notice: (msg) => sink.notice(msg),
          signal: this.s.signal,
        });
      } finally {
        sink.done();
      }
      return (w) => this.writeBuildResult(w, res);
    });
  }

  private async addToStoreNar(): Promise<void> {
    if (this.minor < 23) {
      throw new WorkerError('uploads from clients older than worker protocol 1.23 (Nix 2.4) are not supported');
    }
    const info = await this.readValidPathInfo(this.r);
    await this.r.readBool('repair flag');
    await this.r.readBool('dontCheckSigs flag');
    const framed = new Framed(this.r);
    return this.work(async () => {
      try {
        const nar = new WireReader(framed.source(), this.r.limits);
        await this.s.store.addToStoreNar(this.s.user, info, nar, { holder: this.s.id, signal: this.s.signal });
        if (!(await nar.atEof())) throw new WorkerError(`the upload of '${info.path}' has data after its NAR`);
      } catch (e) {
        await framed.finish();
        throw e;
      }
      await framed.finish();
      return undefined;
    });
  }

  private async addMultipleToStore(): Promise<void> {
    if (this.minor < 32) throw new WorkerError('AddMultipleToStore needs worker protocol 1.32');
    await this.r.readBool('repair flag');
    await this.r.readBool('dontCheckSigs flag');
    const framed = new Framed(this.r);
    return this.work(async () => {
      try {
        const inner = new WireReader(framed.source(), this.r.limits);
        const count = await inner.readCount('paths in the upload', MAX_PATHS);
        const batch = new Set<string>();
        for (let i = 0; i < count; i++) {
          const info = await this.readValidPathInfo(inner);
          await this.s.store.addToStoreNar(this.s.user, info, inner, {
            batch,
            holder: this.s.id,
            signal: this.s.signal,
          });
          batch.add(info.path);
        }
        if (!(await inner.atEof())) throw new WorkerError('the upload has data after its last path');
      } catch (e) {
        await framed.finish();
        throw e;
      }
      await framed.finish();
      return undefined;
    });
  }

  /** AddToStore (≥ 1.25): content-addressed import; the box computes the path from the contents. */
  private async addToStore(): Promise<void> {
    if (this.minor < 25) {
      throw new WorkerError('AddToStore from clients older than worker protocol 1.25 (Nix 2.4) is not supported');
    }
    const nameAt = this.r.offset;
    const name = await this.r.readString('name', 1024);
    const nerr = nameError(name);
    if (nerr !== undefined) throw new WireError(`invalid store path name '${name}': ${nerr}`, nameAt);
    const methodAt = this.r.offset;
    const methodText = await this.r.readString('content-address method', 64);
    let method: ContentAddressMethod;
    let algo: Hash['algo'];
    try {
      ({ method, algo } = parseContentAddressMethod(methodText));
    } catch (e) {
      throw new WireError(errorMessage(e), methodAt);
    }
    const references = await this.readPaths('references');
    await this.r.readBool('repair flag');
    const framed = new Framed(this.r);
    return this.work(async () => {
      const store = this.s.store;
      const tmp = join(store.tmpDir, `addtostore-${this.s.id}-${Date.now()}-${Math.random().toString(36).slice(2)}`);
      try {
        // Stream the payload to a scratch file while hashing it.
        const caSink = new HashSink(algo);
        const fh = await open(tmp, 'wx', 0o644);
        try {
          for await (const chunk of framed.source()) {
            caSink.update(chunk);
            await fh.write(chunk);
          }
        } catch (e) {
          await framed.finish();
          throw e;
        } finally {
          await fh.close();
        }
        await framed.finish();
        if (method === 'git') throw new WorkerError('git-hashed paths cannot be added to buildbox');
        const caHash = caSink.finish().hash;
        const path =
          method === 'text'
            ? makeTextPath(name, caHash, references, this.storeDir)
            : makeFixedOutputPath(name, { method, hash: caHash }, references, false, this.storeDir);
        let narHash: Hash;
        let narSize: number;
        let nar: AsyncIterable<Buffer>;
        if (method === 'recursive') {
          // The payload is the NAR itself: its sha256 is the NAR hash (a second pass only for other algorithms).
          if (algo === 'sha256') {
            narHash = caHash;
            narSize = caSink.size;
          } else {
            const h = new HashSink('sha256');
            const fh2 = await open(tmp, 'r');
            try {
              for await (const c of fh2.createReadStream({ autoClose: false })) h.update(c as Buffer);
            } finally {
              await fh2.close();
            }
            const f = h.finish();
            narHash = f.hash;
            narSize = f.size;
          }
          nar = (async function* () {
            const fh3 = await open(tmp, 'r');
            try {
              for await (const c of fh3.createReadStream({ autoClose: false })) yield c as Buffer;
            } finally {
              await fh3.close();
            }
          })();
        } else {
          const sum = await narHashPath(tmp);
          narHash = new Hash('sha256', sum.narHash);
          narSize = sum.narSize;
          nar = dumpPath(tmp);
        }
        const info: NewPathInfo = {
          path,
          deriver: null,
          narHash,
          narSize,
          references,
          sigs: [],
          ca: renderContentAddress({ method, hash: caHash }),
        };
        const added = await store.addToStoreNar(this.s.user, info, new WireReader(nar), {
          holder: this.s.id,
          signal: this.s.signal,
        });
        return (w: WireWriter) => {
          w.string(added.path);
          this.writeUnkeyedPathInfo(w, added);
        };
      } finally {
        await rm(tmp, { force: true });
      }
    });
  }

  // -------------------------------------------------------------------------------------------------------------
  // Reply encoders

  private writeUnkeyedPathInfo(w: WireWriter, info: PathInfo): void {
    w.string(info.deriver ?? '')
      .string(info.narHash.toBase16())
      .strings(info.references)
      .u64(info.registrationTime)
      .u64(info.narSize);
    if (this.minor >= 16) {
      w.bool(info.ultimate)
        .strings(info.sigs)
        .string(info.ca ?? '');
    }
  }

  private writeBuildResult(w: WireWriter, res: BuildResult): void {
    w.u64(res.status).string(res.errorMsg);
    if (this.minor >= 29) {
      w.u64(res.timesBuilt).bool(res.isNonDeterministic).u64(res.startTime).u64(res.stopTime);
    }
    if (this.minor >= 37) {
      const cpu = res as BuildResult & { cpuUser?: number; cpuSystem?: number };
      for (const v of [cpu.cpuUser, cpu.cpuSystem]) {
        if (v === undefined) w.u64(0);
        else w.u64(1).u64(Math.max(0, Math.round(v)));
      }
    }
    if (this.minor >= 28) {
      w.u64(res.builtOutputs.size);
      for (const [id, json] of res.builtOutputs) w.string(id).string(json);
    }
  }
}

/** One line (or a few) saying which builds failed and why, for `BuildPaths`' STDERR_ERROR. */
function failureMessage(failed: KeyedBuildResult[]): string {
  const one = (k: KeyedBuildResult) => k.result.errorMsg || `build of '${k.path}' failed (status ${k.result.status})`;
  if (failed.length === 1) return one(failed[0]!);
  return `${failed.length} builds failed:\n${failed.map((k) => `  ${one(k)}`).join('\n')}`;
}
