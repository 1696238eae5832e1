/**
 * The legacy serve protocol (`ssh://`, `nix-store --serve [--write]`; spec §2), versions 2.4–2.7. Thin: it decodes
 * commands, asks the session's store view and builder, and encodes replies. There is no error channel: a failure
 * is one `error: …` line on stderr and exit status 1 (§1.7); builds report failures in-band.
 */
import type { Writable } from 'node:stream';
import type { BuildResult } from './build.js';
import { type BasicDerivation, drvNameFromPath, readBasicDerivation } from './derivation.js';
import { Hash } from './hash.js';
import { parseDerivedPath, realise } from './realise.js';
import type { Session } from './session.js';
import type { NewPathInfo, PathInfo } from './store.js';
import { StorePath } from './store-path.js';
import { type ByteSource, limitedSource, WireError, WireReader, WireWriter } from './wire.js';

export const SERVE_MAGIC_1 = 0x390c9deb;
export const SERVE_MAGIC_2 = 0x5452eecb;
export const SERVE_PROTOCOL_VERSION = 0x207;
const EXPORT_MAGIC = 0x4558494e;

export enum ServeCommand {
  QueryValidPaths = 1,
  QueryPathInfos = 2,
  DumpStorePath = 3,
  ImportPaths = 4,
  ExportPaths = 5,
  BuildPaths = 6,
  QueryClosure = 7,
  BuildDerivation = 8,
  AddToStoreNar = 9,
}

/** Longest string accepted for a store path or hash; generous, but bounded before allocation. */
const MAX_PATH = 4096;
const MAX_PATHS = 1_000_000;

export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

export interface ServeIO {
  input: ByteSource;
  output: Writable;
  stderr: Writable;
}

export interface ServeStats {
  commands: number;
  bytesIn: number;
  bytesOut: number;
  clientVersion: number;
}

/** Run one serve-protocol session to its end; resolves with the exit status to send. */
export async function runServe(
  session: Session,
  io: ServeIO,
  opts: { write: boolean },
  stats?: ServeStats,
): Promise<number> {
  const r = new WireReader(io.input, { maxString: 64 * 1024 * 1024 });
  const w = new WireWriter(io.output);
  const st: ServeStats = stats ?? { commands: 0, bytesIn: 0, bytesOut: 0, clientVersion: 0 };
  try {
    await serveLoop(session, r, w, io.stderr, opts, st);
    return 0;
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    if (!session.signal.aborted) {
      session.logger.warn({ err: msg }, 'serve session failed');
      writeStderr(io.stderr, `error: ${msg}\n`);
    }
    return 1;
  } finally {
    st.bytesIn = r.offset;
    st.bytesOut = w.written;
    session.store.releaseTempRoots(session.id);
  }
}

function writeStderr(stderr: Writable, text: string): void {
  if (!stderr.destroyed && stderr.writable) stderr.write(text);
}

async function serveLoop(
  s: Session,
  r: WireReader,
  w: WireWriter,
  stderr: Writable,
  opts: { write: boolean },
  st: ServeStats,
): Promise<void> {
  const magic = await r.readBigU64('serve protocol magic');
  if (magic !== BigInt(SERVE_MAGIC_1)) {
    throw new ProtocolError(
      `protocol mismatch: expected the 'nix-store --serve' magic 0x${SERVE_MAGIC_1.toString(16)}, got 0x${magic.toString(16)}`,
    );
  }
  w.u64(SERVE_MAGIC_2).u64(SERVE_PROTOCOL_VERSION);
  await w.flush();
  const clientVersion = await r.readU64('client version');
  if ((clientVersion & 0xff00) !== 0x200) {
    throw new ProtocolError(`unsupported serve protocol version 0x${clientVersion.toString(16)} (want 2.x)`);
  }
  st.clientVersion = clientVersion;
  const minor = Math.min(clientVersion, SERVE_PROTOCOL_VERSION) & 0xff;
  const storeDir = s.store.storeDir;

  const readPath = async (what = 'store path'): Promise<string> => {
    const start = r.offset;
    const p = await r.readString(what, MAX_PATH);
    try {
      StorePath.parse(p, storeDir);
    } catch (e) {
      throw new WireError((e as Error).message, start);
    }
    return p;
  };
  const readPaths = async (what = 'store paths'): Promise<string[]> => {
    const n = await r.readCount(what, MAX_PATHS);
    const out: string[] = [];
    for (let i = 0; i < n; i++) out.push(await readPath(what));
    return out;
  };
  const needWrite = (what: string) => {
    if (!opts.write) throw new ProtocolError(`${what} is not allowed: the session was not started with --write`);
  };

  for (;;) {
    if (await r.atEof()) return;
    const cmd = await r.readU64('command');
    st.commands++;
    switch (cmd) {
      case ServeCommand.QueryValidPaths: {
        const lock = await r.readBool('lock flag');
        await r.readBool('substitute flag'); // no substituters on the box
        const paths = await readPaths();
        const valid = s.store.queryValidPaths(s.user, paths);
        if (lock && opts.write) for (const p of valid) s.store.addTempRoot(s.id, p);
        w.strings(valid);
        break;
      }
      case ServeCommand.QueryPathInfos: {
        const paths = await readPaths();
        for (const p of paths) {
          const info = s.store.queryPathInfo(s.user, p);
          if (!info) continue;
          s.store.addTempRoot(s.id, p);
          writePathInfo(w, info, minor);
          await w.maybeFlush();
        }
        w.string('');
        break;
      }
      case ServeCommand.DumpStorePath: {
        const p = await readPath();
        if (!s.store.isValidPath(s.user, p)) throw new ProtocolError(`path '${p}' is not valid`);
        s.store.addTempRoot(s.id, p);
        await w.flush();
        // Lent chunks: each is written without a copy and handed back once the channel has sent it.
        for await (const chunk of s.store.narFromPath(s.user, p, { recycle: true })) await w.writeBorrowed(chunk);
        break;
      }
      case ServeCommand.ImportPaths: {
        needWrite('importing paths');
        throw new ProtocolError(
          'ImportPaths (serve command 4) is not supported by buildbox; Nix ≥ 2.1 clients use AddToStoreNar instead',
        );
      }
      case ServeCommand.ExportPaths: {
        await r.readU64('sign flag');
        const paths = await readPaths();
        for (const p of topoSort(s, paths)) {
          const info = s.store.queryPathInfo(s.user, p);
          if (!info) throw new ProtocolError(`path '${p}' is not valid`);
          w.u64(1);
          for await (const chunk of s.store.narFromPath(s.user, p, { recycle: true })) await w.writeBorrowed(chunk);
          w.u64(EXPORT_MAGIC)
            .string(p)
            .strings(info.references)
            .string(info.deriver ?? '')
            .u64(0);
        }
        w.u64(0);
        break;
      }
      case ServeCommand.BuildPaths: {
        needWrite('building paths');
        const raw = await r.readStrings('paths to build', MAX_PATH, MAX_PATHS);
        const options = await readBuildOptions(r, minor);
        // Serve clients use the StorePathWithOutputs syntax: a bare .drv means all of its outputs.
        const paths = raw.map((p) => parseDerivedPath(p, storeDir, true));
        const notice = (msg: string) => writeStderr(stderr, `buildbox: ${msg}\n`);
        const results = await realise(s, paths, {
          options,
          notice,
          startBuild: () => ({
            log: (chunk) => {
              if (!stderr.destroyed && stderr.writable) stderr.write(chunk);
            },
            notice,
            done: () => {},
          }),
        });
        const failed = results.find((k) => !isSuccess(k.result.status));
        if (!failed) w.u64(0);
        else w.u64(failed.result.status).string(failed.result.errorMsg);
        break;
      }
      case ServeCommand.QueryClosure: {
        const includeOutputs = await r.readBool('include-outputs flag');
        const paths = await readPaths();
        const closure = s.store.queryClosure(s.user, paths, includeOutputs);
        for (const p of closure) s.store.addTempRoot(s.id, p);
        w.strings(closure);
        break;
      }
      case ServeCommand.BuildDerivation: {
        needWrite('building paths');
        const drvPath = await readPath('derivation path');
        if (!drvPath.endsWith('.drv')) throw new ProtocolError(`'${drvPath}' is not a derivation path`);
        const drv: BasicDerivation = await readBasicDerivation(r, drvNameFromPath(drvPath));
        const options = await readBuildOptions(r, minor);
        const result = await s.builder.build({
          user: s.user,
          drvPath,
          drv,
          verified: false,
          options,
          log: (chunk) => writeStderr(stderr, chunk.toString('latin1')),
          notice: (msg) => writeStderr(stderr, `buildbox: ${msg}\n`),
          signal: s.signal,
        });
        writeBuildResult(w, result, minor);
        break;
      }
      case ServeCommand.AddToStoreNar: {
        needWrite('importing paths');
        const path = await readPath();
        const deriver = await r.readString('deriver', MAX_PATH);
        if (deriver !== '') StorePath.parse(deriver, storeDir);
        const narHashText = await r.readString('NAR hash', 256);
        const references = await readPaths('references');
        const registrationTime = await r.readU64('registration time');
        const narSize = await r.readU64('NAR size');
        await r.readBool('ultimate flag'); // never trusted from a client
        const sigs = await r.readStrings('signatures', 1024, 1024);
        const ca = await r.readString('content address', 1024);
        if (narSize === 0) throw new ProtocolError(`path '${path}' was sent without a NAR size`);
        let narHash: Hash;
        try {
          narHash = Hash.parseAny(narHashText, 'sha256');
        } catch (e) {
          throw new ProtocolError(`bad NAR hash for '${path}': ${(e as Error).message}`);
        }
        const info: NewPathInfo = {
          path,
          deriver: deriver || null,
          narHash,
          narSize,
          references,
          registrationTime,
          sigs,
          ca: ca || null,
        };
        const nar = new WireReader(limitedSource(r, narSize, `NAR of ${path}`));
        await s.store.addToStoreNar(s.user, info, nar, { holder: s.id });
        // The NAR must end exactly at narSize; anything left over is a client error.
        if (!(await nar.atEof()))
          throw new ProtocolError(`NAR of '${path}' is shorter than its declared size ${narSize}`);
        w.u64(1);
        break;
      }
      default:
        throw new ProtocolError(`unknown serve command ${cmd}`);
    }
    await w.flush();
  }
}

/** Paths ordered so that every path comes after its references (within the given set). */
function topoSort(s: Session, paths: string[]): string[] {
  const want = new Set(paths);
  const out: string[] = [];
  const state = new Map<string, 1 | 2>();
  const visit = (p: string) => {
    if (state.get(p) === 2) return;
    if (state.get(p) === 1) throw new ProtocolError(`reference cycle through '${p}'`);
    state.set(p, 1);
    for (const ref of s.store.queryPathInfo(s.user, p)?.references ?? []) if (ref !== p && want.has(ref)) visit(ref);
    state.set(p, 2);
    out.push(p);
  };
  for (const p of paths) visit(p);
  return out;
}

export interface ClientBuildOptions {
  maxSilentTime: number;
  buildTimeout: number;
  maxLogSize: number;
}

async function readBuildOptions(r: WireReader, minor: number): Promise<ClientBuildOptions> {
  const maxSilentTime = await r.readU64('maxSilentTime');
  const buildTimeout = await r.readU64('buildTimeout');
  const maxLogSize = minor >= 2 ? await r.readU64('maxLogSize') : 0;
  if (minor >= 3) {
    const nrRepeats = await r.readU64('nrRepeats');
    await r.readBool('enforceDeterminism');
    if (nrRepeats > 0)
      throw new ProtocolError('client requested repeating builds, but buildbox does not implement them');
  }
  if (minor >= 7) await r.readBool('keepFailed');
  return { maxSilentTime, buildTimeout, maxLogSize };
}

export function isSuccess(status: number): boolean {
  return status === 0 || status === 1 || status === 2 || status === 13;
}

function writePathInfo(w: WireWriter, info: PathInfo, minor: number): void {
  w.string(info.path)
    .string(info.deriver ?? '')
    .strings(info.references)
    .u64(info.narSize)
    .u64(info.narSize);
  if (minor >= 4) {
    w.string(`sha256:${info.narHash.toNix32()}`)
      .string(info.ca ?? '')
      .strings(info.sigs);
  }
}

function writeBuildResult(w: WireWriter, res: BuildResult, minor: number): void {
  w.u64(res.status).string(res.errorMsg);
  if (minor >= 3) {
    w.u64(res.timesBuilt).bool(res.isNonDeterministic).u64(res.startTime).u64(res.stopTime);
  }
  if (minor >= 6) {
    w.u64(res.builtOutputs.size);
    for (const [id, json] of res.builtOutputs) w.string(id).string(json);
  }
}
