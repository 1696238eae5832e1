/**
 * Running one derivation on the box (spec §6.4–6.9): checks, queueing for a slot, the builder's environment (§6.5),
 * the sandboxed builder (module `sandbox`), logs and limits (§6.7), post-processing and registration (§6.8), and the
 * BuildResult (§2.6, §6.9).
 *
 * A build holds its input closure with temporary roots (holder = the build id) from the moment it is accepted until
 * it ends, queued or running. The builder runs as the slot's own uid; when it ends — by itself, by a limit, or because
 * the client went away — every process of that uid is killed before its outputs are touched, so nothing can change
 * them while they are canonicalised (mtime 1, modes 0444/0555, owner root), scanned for references, hashed and moved
 * into the store.
 */
import { randomBytes } from 'node:crypto';
import { createWriteStream, type WriteStream } from 'node:fs';
import {
  chmod,
  chown,
  lchown,
  lstat,
  lutimes,
  mkdir,
  readdir,
  readFile,
  rename,
  rm,
  writeFile,
} from 'node:fs/promises';
import { join } from 'node:path';
import { createGzip, type Gzip } from 'node:zlib';
import type { Logger } from 'pino';
import {
  type BasicDerivation,
  builtOutputs,
  checkFixedOutputHash,
  DerivationAttrs,
  derivationKind,
  fixedOutputCa,
  hashPlaceholder,
  type OutputKind,
  passAsFileName,
} from './derivation.js';
import { Hash, HashSink } from './hash.js';
import { dumpPath, NarHasher } from './nar.js';
import { RefScanner } from './references.js';
import {
  killUidProcesses,
  prepareSandboxDirs,
  SANDBOX_BUILD_DIR,
  type SandboxDirs,
  type SandboxInput,
  spawnSandbox,
  writeExecHelper,
} from './sandbox.js';
import type { Scheduler, Slot } from './scheduler.js';
import type { Scope, Store } from './store.js';
import {
  type ContentAddress,
  compareBytes,
  DEFAULT_STORE_DIR,
  makeFixedOutputPath,
  outputPathName,
  renderContentAddress,
  StorePath,
} from './store-path.js';

/** BuildResult status values (§6.9). */
export const BuildStatus = {
  Built: 0,
  Substituted: 1,
  AlreadyValid: 2,
  PermanentFailure: 3,
  InputRejected: 4,
  OutputRejected: 5,
  TransientFailure: 6,
  CachedFailure: 7,
  TimedOut: 8,
  MiscFailure: 9,
  DependencyFailed: 10,
  LogLimitExceeded: 11,
  NotDeterministic: 12,
  ResolvesToAlreadyValid: 13,
  NoSubstituters: 14,
} as const;

export interface BuildOptions {
  /** Seconds without output before the build is killed; 0 = no limit (the box's cap still applies). */
  maxSilentTime: number;
  /** Seconds of total build time; 0 = no limit (the box's cap still applies). */
  buildTimeout: number;
  /** Bytes of log before the build is killed; 0 = no limit (the box's cap still applies). */
  maxLogSize: number;
}

export interface BuildRequest {
  user: string;
  drvPath: string;
  drv: BasicDerivation;
  /** The output paths were verified against the full `.drv` closure (worker BuildPaths), not just claimed. */
  verified: boolean;
  options: BuildOptions;
  /** Builder output, live. */
  log(chunk: Buffer): void;
  /** Box messages (queue position…). */
  notice(msg: string): void;
  /** Client gone → cancel. */
  signal: AbortSignal;
}

export interface BuildResult {
  status: number;
  errorMsg: string;
  timesBuilt: number;
  isNonDeterministic: boolean;
  startTime: number;
  stopTime: number;
  /** DrvOutput id → realisation JSON. */
  builtOutputs: Map<string, string>;
}

export interface BuilderConfig {
  system: string;
  extraPlatforms: string[];
  /** `supported-features`. */
  features: string[];
  /** A derivation must require all of these to be built here. */
  mandatoryFeatures: string[];
  /** `NIX_BUILD_CORES`. */
  cores: number;
  /** Box caps on the client's limits (seconds, seconds, bytes); 0 or absent = no cap. */
  maxSilentTime?: number;
  buildTimeout?: number;
  maxLogSize?: number;
  /** Compressed build logs: `<logDir>/<user>/<drv base name>.gz`. */
  logDir: string;
  /** Per-build sandbox directories are made here (must be traversable by the build uids; made 0711). */
  buildDirRoot: string;
  storeDir?: string;
  /** Where `impureEnvVars` of fixed-output builds are read from (default: this process's environment). */
  impureEnv?: Record<string, string | undefined>;
  /** Lines of log quoted in a failure message (Nix's `log-lines`, default 10). */
  logLines?: number;
}

export interface BuilderOptions {
  store: Store;
  scheduler: Scheduler;
  config: BuilderConfig;
  logger?: Logger;
}

/** A build that ends with a given status and message (never thrown out of `build`). */
export class BuildFailure extends Error {
  constructor(
    readonly status: number,
    message: string,
    /** Timeouts and log-limit failures report stopTime 0, as Nix does. */
    readonly zeroStopTime = false,
  ) {
    super(message);
    this.name = 'BuildFailure';
  }
}

const nowSeconds = (): number => Math.floor(Date.now() / 1000);

/** min over the limits that are set (0 = unset). */
function capLimit(client: number, box: number | undefined): number {
  const c = Number.isFinite(client) && client > 0 ? client : 0;
  const b = box !== undefined && Number.isFinite(box) && box > 0 ? box : 0;
  if (c === 0) return b;
  if (b === 0) return c;
  return Math.min(c, b);
}

function baseName(p: string): string {
  return p.slice(p.lastIndexOf('/') + 1);
}

function errMsg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

/** Why a build was cancelled: the abort reason if it gives one (e.g. shutdown), else the client went away. */
function cancelMessage(drvPath: string, signal: AbortSignal): string {
  const r: unknown = signal.reason;
  const why = r instanceof Error && r.name !== 'AbortError' ? r.message : 'the client went away';
  return `build of '${drvPath}' cancelled: ${why}`;
}

/** Bytes (latin1 string) to text for a message: valid UTF-8 is shown as such. */
function latin1ToText(s: string): string {
  return Buffer.from(s, 'latin1').toString('utf8');
}

/** The last lines of a log, with Nix's line discipline (`\r` returns to the start of the line). */
export class LogTail {
  private readonly lines: string[] = [];
  private cur: string[] = [];
  private pos = 0;
  private static readonly MAX_LINE = 64 * 1024;

  constructor(private readonly keep: number) {}

  push(chunk: Buffer): void {
    const s = chunk.toString('latin1');
    let start = 0;
    for (let i = 0; i <= s.length; i++) {
      const c = i < s.length ? s.charCodeAt(i) : -1;
      if (c !== 10 && c !== 13 && c !== -1) continue;
      if (i > start) this.write(s.slice(start, i));
      if (c === 13) this.pos = 0;
      else if (c === 10) this.flush();
      start = i + 1;
    }
  }

  private write(text: string): void {
    for (const ch of text) {
      if (this.pos >= LogTail.MAX_LINE) return;
      this.cur[this.pos++] = ch;
    }
  }

  private flush(): void {
    this.lines.push(this.cur.join(''));
    if (this.lines.length > this.keep) this.lines.shift();
    this.cur = [];
    this.pos = 0;
  }

  /** The kept lines, including an unterminated last one. */
  result(): string[] {
    if (this.cur.length > 0) this.flush();
    return [...this.lines];
  }
}

/** `<name>` plus Nix's "last N log lines" block, if there is any log. */
function withLogTail(msg: string, tail: string[]): string {
  if (tail.length === 0) return msg;
  return `${msg};\nlast ${tail.length} log lines:\n${tail.map((l) => `> ${latin1ToText(l)}`).join('\n')}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Environment (§6.5)

const SH_VAR_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
const EXPORT_NAME = /^[A-Za-z_][A-Za-z0-9_.-]*$/;

function tokenize(s: string): string[] {
  return s.split(/[ \t\n\r]+/).filter((t) => t !== '');
}

/** Replace every occurrence of each key by its value (Nix's rewriteStrings). */
function rewriteStrings(s: string, rewrites: Map<string, string>): string {
  let out = s;
  for (const [from, to] of rewrites) if (out.includes(from)) out = out.split(from).join(to);
  return out;
}

/** JSON as nlohmann's `dump()` writes it: compact, object keys sorted bytewise. */
export function nlohmannDump(v: unknown): string {
  if (v === null || typeof v !== 'object') return JSON.stringify(v) ?? 'null';
  if (Array.isArray(v)) return `[${v.map((x) => nlohmannDump(x)).join(',')}]`;
  const keys = Object.keys(v as Record<string, unknown>).sort(compareUtf16AsUtf8);
  return `{${keys.map((k) => `${JSON.stringify(k)}:${nlohmannDump((v as Record<string, unknown>)[k])}`).join(',')}}`;
}

function compareUtf16AsUtf8(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

function shellEscape(s: string): string {
  return `'${s.replaceAll("'", "'\\''")}'`;
}

/** Nix's `writeStructuredAttrsShell`: `declare` lines for simple top-level values, flat arrays and flat objects. */
export function structuredAttrsShell(json: Record<string, unknown>): string {
  const simple = (v: unknown): string | undefined => {
    if (typeof v === 'string') return shellEscape(v);
    if (typeof v === 'number') return Number.isInteger(v) ? String(v) : undefined;
    if (v === null) return "''";
    if (typeof v === 'boolean') return v ? '1' : "''";
    return undefined;
  };
  let out = '';
  for (const key of Object.keys(json).sort(compareUtf16AsUtf8)) {
    if (!SH_VAR_NAME.test(key)) continue;
    const value = json[key];
    const s = simple(value);
    if (s !== undefined) {
      out += `declare ${key}=${s}\n`;
    } else if (Array.isArray(value)) {
      const parts = value.map(simple);
      if (parts.every((p) => p !== undefined)) out += `declare -a ${key}=(${parts.map((p) => `${p} `).join('')})\n`;
    } else if (value !== null && typeof value === 'object') {
      const obj = value as Record<string, unknown>;
      const keys = Object.keys(obj).sort(compareUtf16AsUtf8);
      const parts = keys.map((k) => [k, simple(obj[k])] as const);
      if (parts.every(([, p]) => p !== undefined)) {
        out += `declare -A ${key}=(${parts.map(([k, p]) => `[${shellEscape(k)}]=${p} `).join('')})\n`;
      }
    }
  }
  return out;
}

/** A file to create in the build directory (owned by the build user). */
interface BuildDirFile {
  name: string;
  data: Buffer;
}

export interface PreparedEnvironment {
  env: Map<string, string>;
  args: string[];
  files: BuildDirFile[];
}

interface EnvContext {
  drv: BasicDerivation;
  attrs: DerivationAttrs;
  kind: OutputKind;
  storeDir: string;
  cores: number;
  impureEnv: Record<string, string | undefined>;
  /** Closure info for exportReferencesGraph: the input closure and a path-info lookup. */
  inputClosure: ReadonlySet<string>;
  closureOf(paths: string[]): string[];
  infoOf(path: string): { narHash: Hash; narSize: number; references: string[]; ca: string | null } | undefined;
}

/** The builder's environment, arguments and build-directory files, exactly as Nix makes them (§6.5). */
export function prepareEnvironment(ctx: EnvContext): PreparedEnvironment {
  const { drv, attrs } = ctx;
  const top = SANDBOX_BUILD_DIR;
  const rewrites = new Map<string, string>();
  for (const [name, o] of drv.outputs) if (o.path !== '') rewrites.set(hashPlaceholder(name), o.path);
  const files: BuildDirFile[] = [];
  const env = new Map<string, string>();
  env.set('PATH', '/path-not-set');
  env.set('HOME', '/homeless-shelter');
  env.set('NIX_STORE', ctx.storeDir);
  env.set('NIX_BUILD_CORES', String(ctx.cores));

  const exportClosure = (paths: string[]): string[] => {
    for (const p of paths) {
      if (!ctx.inputClosure.has(p)) {
        throw new BuildFailure(
          BuildStatus.MiscFailure,
          `cannot export references of path '${p}' because it is not in the input closure of the derivation`,
        );
      }
    }
    return ctx.closureOf(paths);
  };

  if (!attrs.structured) {
    const passAsFile = new Set(tokenize(drv.env.get('passAsFile') ?? ''));
    for (const [k, v] of drv.env) {
      if (!passAsFile.has(k)) env.set(k, v);
      else {
        const fn = passAsFileName(k);
        files.push({ name: fn, data: Buffer.from(rewriteStrings(v, rewrites), 'latin1') });
        env.set(`${k}Path`, `${top}/${fn}`);
      }
    }
    // exportReferencesGraph: `name path name path …` → files in the nix-store --register-validity format.
    const erg = drv.env.get('exportReferencesGraph');
    if (erg !== undefined) {
      const ss = tokenize(erg);
      if (ss.length % 2 !== 0) {
        throw new BuildFailure(BuildStatus.MiscFailure, `odd number of tokens in 'exportReferencesGraph': '${erg}'`);
      }
      for (let i = 0; i < ss.length; i += 2) {
        const fileName = ss[i]!;
        const p = ss[i + 1]!;
        if (!EXPORT_NAME.test(fileName)) {
          throw new BuildFailure(BuildStatus.MiscFailure, `invalid file name '${fileName}' in 'exportReferencesGraph'`);
        }
        if (!p.startsWith(`${ctx.storeDir}/`)) {
          throw new BuildFailure(BuildStatus.MiscFailure, `'exportReferencesGraph' contains a non-store path '${p}'`);
        }
        const sp = `${ctx.storeDir}/${p.slice(ctx.storeDir.length + 1).split('/')[0]}`;
        let text = '';
        for (const q of exportClosure([sp])) {
          const refs = ctx.infoOf(q)?.references ?? [];
          text += `${q}\n\n${refs.length}\n${refs.map((r) => `${r}\n`).join('')}`;
        }
        files.push({ name: fileName, data: Buffer.from(text, 'latin1') });
      }
    }
  }

  for (const k of ['NIX_BUILD_TOP', 'TMPDIR', 'TEMPDIR', 'TMP', 'TEMP', 'PWD']) env.set(k, top);
  if (ctx.kind === 'fixed') env.set('NIX_OUTPUT_CHECKED', '1');
  if (ctx.kind === 'fixed' || ctx.kind === 'impure') {
    for (const name of attrs.getStrings('impureEnvVars') ?? []) env.set(name, ctx.impureEnv[name] ?? '');
  }
  env.set('NIX_LOG_FD', '2');
  env.set('TERM', 'xterm-256color');

  if (attrs.structured) {
    const json: Record<string, unknown> = { ...attrs.structured };
    const outputs: Record<string, string> = {};
    for (const [name, o] of drv.outputs) outputs[name] = o.path !== '' ? o.path : hashPlaceholder(name);
    json.outputs = outputs;
    const erg = json.exportReferencesGraph;
    if (erg !== null && typeof erg === 'object' && !Array.isArray(erg)) {
      for (const [key, value] of Object.entries(erg as Record<string, unknown>)) {
        const paths = (Array.isArray(value) ? value : [value]).filter((x): x is string => typeof x === 'string');
        const closure = exportClosure(paths);
        json[key] = closure.map((q) => {
          const info = ctx.infoOf(q)!;
          const closureSize = ctx.closureOf([q]).reduce((n, r) => n + (ctx.infoOf(r)?.narSize ?? 0), 0);
          const o: Record<string, unknown> = {
            closureSize,
            narHash: `sha256:${info.narHash.toNix32()}`,
            narSize: info.narSize,
            path: q,
            references: info.references,
          };
          if (info.ca) o.ca = info.ca;
          return o;
        });
      }
    }
    // __json was UTF-8; Nix writes the files as UTF-8 and rewrites placeholders in them.
    const sh = structuredAttrsShell(json);
    const rewritesUtf8 = new Map([...rewrites].map(([a, b]) => [latin1ToText(a), latin1ToText(b)]));
    files.push({ name: '.attrs.sh', data: Buffer.from(rewriteStrings(sh, rewritesUtf8), 'utf8') });
    files.push({ name: '.attrs.json', data: Buffer.from(rewriteStrings(nlohmannDump(json), rewritesUtf8), 'utf8') });
    env.set('NIX_ATTRS_SH_FILE', `${top}/.attrs.sh`);
    env.set('NIX_ATTRS_JSON_FILE', `${top}/.attrs.json`);
  }

  const finalEnv = new Map<string, string>();
  for (const [k, v] of env) finalEnv.set(rewriteStrings(k, rewrites), rewriteStrings(v, rewrites));
  return { env: finalEnv, args: drv.args.map((a) => rewriteStrings(a, rewrites)), files };
}

// ---------------------------------------------------------------------------------------------------------------
// Post-processing helpers (§6.8)

/** Canonicalise a tree in place: owner root, mtime 1, modes 0444/0555 (no write, setuid or setgid bits). */
async function canonicalise(root: string, describe: (p: string) => string): Promise<void> {
  const stack = [root];
  while (stack.length > 0) {
    const p = stack.pop()!;
    const st = await lstat(p);
    if (st.isDirectory()) {
      for (const e of await readdir(p)) stack.push(join(p, e));
    } else if (!st.isFile() && !st.isSymbolicLink()) {
      throw new BuildFailure(BuildStatus.OutputRejected, `file '${describe(p)}' has an unsupported type`);
    }
    await lchown(p, 0, 0);
    if (st.isDirectory()) await chmod(p, 0o555);
    else if (st.isFile()) await chmod(p, st.mode & 0o100 ? 0o555 : 0o444);
    await lutimes(p, st.atime, 1);
  }
}

/** Remove a tree whatever its modes (as root this is just rm; otherwise make directories writable first). */
async function removeTree(p: string): Promise<void> {
  try {
    await rm(p, { recursive: true, force: true });
    return;
  } catch {
    // fall through
  }
  const walk = async (q: string): Promise<void> => {
    const st = await lstat(q).catch(() => undefined);
    if (!st?.isDirectory()) return;
    await chmod(q, 0o700).catch(() => {});
    for (const e of await readdir(q).catch(() => [] as string[])) await walk(join(q, e));
  };
  await walk(p);
  await rm(p, { recursive: true, force: true });
}

interface OutputResult {
  name: string;
  path: string;
  fsPath: string;
  narHash: Hash;
  narSize: number;
  references: string[];
  ca: string | null;
}

// ---------------------------------------------------------------------------------------------------------------
// The builder

let buildSeq = 0;

/** Where a user's build logs are kept (user names are registry names: no `/`, never `.` or `..`). */
export function buildLogDir(logDir: string, user: string): string {
  return join(logDir, user);
}

export class Builder {
  readonly store: Store;
  readonly scheduler: Scheduler;
  readonly config: BuilderConfig;
  readonly storeDir: string;
  private readonly logger: Logger | undefined;
  private readonly active = new Map<string, { ctrl: AbortController; done: Promise<unknown> }>();
  /** Host path of the exec helper (argv[0] = basename of the builder), null where there is none. */
  private execHelper: string | null | undefined;

  constructor(opts: BuilderOptions) {
    this.store = opts.store;
    this.scheduler = opts.scheduler;
    this.config = opts.config;
    this.logger = opts.logger;
    this.storeDir = opts.config.storeDir ?? DEFAULT_STORE_DIR;
  }

  /** Build `req.drv`. Never throws: every failure is a BuildResult with a status and a one-paragraph message. */
  build(req: BuildRequest): Promise<BuildResult> {
    const id = `build-${process.pid}-${++buildSeq}-${randomBytes(4).toString('hex')}`;
    const ctrl = new AbortController();
    const onAbort = (): void => ctrl.abort(req.signal.reason);
    if (req.signal.aborted) ctrl.abort(req.signal.reason);
    else req.signal.addEventListener('abort', onAbort, { once: true });
    const startTime = nowSeconds();
    const done = this.run(id, req, ctrl.signal, startTime)
      .catch((e: unknown): BuildResult => {
        if (e instanceof BuildFailure) {
          return this.result(e.status, e.message, startTime, e.zeroStopTime ? 0 : nowSeconds());
        }
        this.logger?.error({ err: e, drv: req.drvPath, user: req.user }, 'build failed unexpectedly');
        return this.result(
          BuildStatus.MiscFailure,
          `building '${req.drvPath}' failed on the box: ${errMsg(e)}`,
          startTime,
          nowSeconds(),
        );
      })
      .finally(() => {
        req.signal.removeEventListener('abort', onAbort);
        this.active.delete(id);
      });
    this.active.set(id, { ctrl, done });
    return done;
  }

  /** Number of builds accepted and not finished (queued or running). */
  get activeBuilds(): number {
    return this.active.size;
  }

  /** Cancel every build (queued or running) and wait until they are cleaned up. */
  async close(): Promise<void> {
    const all = [...this.active.values()];
    for (const b of all) b.ctrl.abort(new Error('the box is shutting down'));
    await Promise.allSettled(all.map((b) => b.done));
  }

  private result(status: number, errorMsg: string, startTime: number, stopTime: number): BuildResult {
    return {
      status,
      errorMsg,
      timesBuilt: 0,
      isNonDeterministic: false,
      startTime,
      stopTime,
      builtOutputs: new Map(),
    };
  }

  /** `building of '<drv>!<outputs>' from in-memory derivation` — Nix's goal name, used in limit messages. */
  private goalName(req: BuildRequest): string {
    return `building of '${req.drvPath}!${[...req.drv.outputs.keys()].join(',')}' from in-memory derivation`;
  }

  private checkPlatform(req: BuildRequest, attrs: DerivationAttrs): void {
    const { drv, drvPath } = req;
    const c = this.config;
    const required = attrs.requiredSystemFeatures();
    const features = new Set(c.features);
    const systems = new Set([c.system, ...c.extraPlatforms]);
    const missing: string[] = [];
    if (!systems.has(drv.platform)) {
      missing.push(
        drv.platform === 'builtin'
          ? `builtin builder '${drv.builder}' (buildbox runs no builtin builders)`
          : `system '${drv.platform}' (this box builds ${[...systems].map((s) => `'${s}'`).join(', ')})`,
      );
    }
    const missingFeatures = required.filter((f) => !features.has(f));
    if (missingFeatures.length > 0) {
      missing.push(
        `feature${missingFeatures.length > 1 ? 's' : ''} ${missingFeatures.map((f) => `'${f}'`).join(', ')}`,
      );
    }
    if (missing.length > 0) {
      const fmt = (xs: Iterable<string>): string => [...xs].sort(compareBytes).join(', ');
      throw new BuildFailure(
        BuildStatus.MiscFailure,
        `a '${drv.platform}' with features {${fmt(required)}} is required to build '${drvPath}', ` +
          `but I am a '${c.system}' with features {${fmt(features)}}; missing: ${missing.join('; ')}`,
      );
    }
    const mandatoryMissing = c.mandatoryFeatures.filter((f) => !required.includes(f));
    if (mandatoryMissing.length > 0) {
      throw new BuildFailure(
        BuildStatus.MiscFailure,
        `this box only builds derivations that require its mandatory features {${c.mandatoryFeatures.join(', ')}}, ` +
          `but '${drvPath}' does not require ${mandatoryMissing.map((f) => `'${f}'`).join(', ')}`,
      );
    }
  }

  private async run(id: string, req: BuildRequest, signal: AbortSignal, startTime: number): Promise<BuildResult> {
    const { drv, drvPath, user } = req;
    const store = this.store;
    const fail = (status: number, msg: string): never => {
      throw new BuildFailure(status, msg);
    };

    // 1. Kind, attributes, platform and features.
    let kind: OutputKind;
    let attrs: DerivationAttrs;
    try {
      kind = derivationKind(drv);
      attrs = new DerivationAttrs(drv);
    } catch (e) {
      return fail(BuildStatus.MiscFailure, `cannot build '${drvPath}': ${errMsg(e)}`);
    }
    this.checkPlatform(req, attrs);
    if (kind !== 'inputAddressed' && kind !== 'fixed') {
      fail(
        BuildStatus.MiscFailure,
        `cannot build '${drvPath}': it has ${kind} outputs; buildbox builds only input-addressed and fixed-output derivations`,
      );
    }
    const outputs = new Map<string, string>();
    for (const [name, o] of drv.outputs) {
      try {
        StorePath.parse(o.path, this.storeDir);
      } catch (e) {
        fail(BuildStatus.MiscFailure, `cannot build '${drvPath}': output '${name}': ${errMsg(e)}`);
      }
      outputs.set(name, o.path);
    }
    let fixedCa: ContentAddress | undefined;
    if (kind === 'fixed') {
      fixedCa = fixedOutputCa(drv)!;
      if (fixedCa.method === 'git') {
        fail(BuildStatus.MiscFailure, `cannot build '${drvPath}': git hashing is not supported`);
      }
      // The wire reader recomputes a fixed output's path (§6.2); make sure nobody handed us a claimed one.
      const expected = makeFixedOutputPath(outputPathName(drv.name, 'out'), fixedCa, [], false, this.storeDir);
      if (outputs.get('out') !== expected) {
        fail(
          BuildStatus.MiscFailure,
          `cannot build '${drvPath}': its fixed output path is '${outputs.get('out')}', but its hash makes it '${expected}'`,
        );
      }
    }

    // 2. Already valid?
    if ([...outputs.values()].every((p) => store.isValidPath(user, p))) {
      return {
        ...this.result(BuildStatus.AlreadyValid, '', startTime, nowSeconds()),
        builtOutputs: builtOutputs(drv, outputs, this.storeDir),
      };
    }

    // 3. Inputs.
    for (const p of drv.inputSrcs) {
      if (!store.isValidPath(user, p)) {
        fail(BuildStatus.MiscFailure, `dependency '${p}' of '${drvPath}' does not exist, and substitution is disabled`);
      }
    }
    try {
      for (const p of drv.inputSrcs) store.addTempRoot(id, p);
      const closure = store.queryClosure(user, drv.inputSrcs);
      for (const p of closure) store.addTempRoot(id, p);
      const closureSet = new Set(closure);
      for (const [name, p] of outputs) {
        if (closureSet.has(p)) {
          fail(BuildStatus.MiscFailure, `output '${name}' of '${drvPath}' ('${p}') is also one of its inputs`);
        }
      }

      // 4. A slot.
      if (signal.aborted) fail(BuildStatus.MiscFailure, cancelMessage(drvPath, signal));
      let slot: Slot;
      try {
        slot = await this.scheduler.acquire(user, {
          signal,
          onPosition: (ahead) => {
            try {
              req.notice(`waiting for a build slot: ${ahead} ahead of you`);
            } catch {
              // the client is going away; the abort signal tells us
            }
          },
        });
      } catch (e) {
        if (signal.aborted) return fail(BuildStatus.MiscFailure, cancelMessage(drvPath, signal));
        return fail(BuildStatus.MiscFailure, `cannot build '${drvPath}': ${errMsg(e)}`);
      }
      return await this.runInSlot({
        id,
        req,
        signal,
        slot,
        kind,
        attrs,
        closure,
        closureSet,
        outputs,
        fixedCa,
        startTime,
      });
    } finally {
      store.releaseTempRoots(id);
    }
  }

  private async runInSlot(b: {
    id: string;
    req: BuildRequest;
    signal: AbortSignal;
    slot: Slot;
    kind: OutputKind;
    attrs: DerivationAttrs;
    closure: string[];
    closureSet: Set<string>;
    outputs: Map<string, string>;
    fixedCa: ContentAddress | undefined;
    startTime: number;
  }): Promise<BuildResult> {
    const { id, req, slot, signal } = b;
    const { drv, drvPath, user } = req;
    const store = this.store;
    let released = false;
    const release = (): void => {
      if (!released) {
        released = true;
        slot.release();
      }
    };
    let dirs: SandboxDirs | undefined;
    /** Nothing runs as the slot uid (false from the sandbox's start until runBuilder has made sure of it). */
    let noProcesses = true;
    try {
      await mkdir(this.config.buildDirRoot, { recursive: true, mode: 0o711 });
      await chmod(this.config.buildDirRoot, 0o711);
      if (this.execHelper === undefined) {
        const p = join(this.config.buildDirRoot, '.exec-helper');
        this.execHelper = writeExecHelper(p) ? p : null;
      }
      dirs = await prepareSandboxDirs(join(this.config.buildDirRoot, id), slot.uid, slot.gid, {
        fixedOutput: b.kind === 'fixed',
      });

      // Environment and build-directory files.
      const prepared = prepareEnvironment({
        drv,
        attrs: b.attrs,
        kind: b.kind,
        storeDir: this.storeDir,
        cores: this.config.cores,
        impureEnv: this.config.impureEnv ?? process.env,
        inputClosure: b.closureSet,
        closureOf: (paths) => store.queryClosure(user, paths),
        infoOf: (p) => store.queryPathInfo(user, p),
      });
      for (const f of prepared.files) {
        const fp = join(dirs.buildDir, f.name);
        await writeFile(fp, f.data, { mode: 0o644, flag: 'wx' });
        await chown(fp, slot.uid, slot.gid);
      }

      const inputs: SandboxInput[] = [];
      for (const p of b.closure) {
        const hostPath = await store.realPath(user, p);
        if (hostPath === undefined) {
          throw new BuildFailure(BuildStatus.MiscFailure, `dependency '${p}' of '${drvPath}' vanished from the store`);
        }
        inputs.push({ path: p, hostPath });
      }

      noProcesses = false;
      const run = await this.runBuilder(b, dirs, inputs, prepared);
      noProcesses = true; // runBuilder returns only once every process of the slot uid is dead
      if (run.failure) throw run.failure;

      const built = await this.postProcess(b, dirs);
      const scope: Scope =
        (req.verified || b.kind === 'fixed') && b.closure.every((p) => store.queryPathInfo(user, p)?.scope === 'public')
          ? 'public'
          : user;
      try {
        store.registerOutputs(
          user,
          built.map((o) => ({
            info: {
              path: o.path,
              deriver: drvPath,
              narHash: o.narHash,
              narSize: o.narSize,
              references: o.references,
              ultimate: true,
              ca: o.ca,
            },
            fsPath: o.fsPath,
          })),
          scope,
        );
      } catch (e) {
        throw new BuildFailure(BuildStatus.OutputRejected, `cannot register the outputs of '${drvPath}': ${errMsg(e)}`);
      }
      this.logger?.info({ drv: drvPath, user, scope, outputs: built.map((o) => o.path) }, 'built');
      return {
        status: BuildStatus.Built,
        errorMsg: '',
        timesBuilt: 1,
        isNonDeterministic: false,
        startTime: b.startTime,
        stopTime: nowSeconds(),
        builtOutputs: builtOutputs(drv, b.outputs, this.storeDir),
      };
    } finally {
      // Outputs are in the store or discarded. Processes are dead unless runBuilder failed to make sure of it.
      if (!noProcesses) {
        await killUidProcesses(slot.uid).catch((e) => this.logger?.error({ err: e }, 'cannot kill build processes'));
      }
      release();
      if (dirs) await removeTree(dirs.top).catch((e) => this.logger?.warn({ err: e }, 'cannot remove build dir'));
      if (signal.aborted) this.logger?.info({ drv: drvPath, user }, 'build cancelled');
    }
  }

  /** Run the builder under the limits; returns once every process of the slot uid is gone. */
  private async runBuilder(
    b: { req: BuildRequest; slot: Slot; kind: OutputKind; signal: AbortSignal },
    dirs: SandboxDirs,
    inputs: SandboxInput[],
    prepared: PreparedEnvironment,
  ): Promise<{ failure?: BuildFailure }> {
    const { req, slot, signal } = b;
    const { drv, drvPath } = req;
    const maxSilent = capLimit(req.options.maxSilentTime, this.config.maxSilentTime);
    const timeout = capLimit(req.options.buildTimeout, this.config.buildTimeout);
    const maxLog = capLimit(req.options.maxLogSize, this.config.maxLogSize);
    const tail = new LogTail(this.config.logLines ?? 10);
    const log = this.openLog(req.user, drvPath);

    const proc = spawnSandbox(
      {
        dirs,
        storeDir: this.storeDir,
        inputs,
        fixedOutput: b.kind === 'fixed',
        builder: drv.builder,
        args: prepared.args,
        env: prepared.env,
        execHelper: this.execHelper ?? undefined,
      },
      {
        uid: slot.uid,
        gid: slot.gid,
        personality: drv.platform === 'i686-linux' && process.arch === 'x64' ? 'i686' : undefined,
      },
    );
    let failure: BuildFailure | undefined;
    const stop = (f: BuildFailure): void => {
      if (failure) return;
      failure = f;
      proc.kill();
    };
    let logBytes = 0;
    let lastOutput = Date.now();
    proc.output.on('data', (chunk: Buffer) => {
      if (failure) return;
      lastOutput = Date.now();
      logBytes += chunk.length;
      if (maxLog > 0 && logBytes > maxLog) {
        stop(
          new BuildFailure(
            BuildStatus.LogLimitExceeded,
            `${this.goalName(req)} killed after writing more than ${maxLog} bytes of log output`,
            true,
          ),
        );
        return;
      }
      tail.push(chunk);
      log.write(chunk);
      try {
        req.log(chunk);
      } catch {
        // a broken client sink: the abort signal will follow
      }
    });
    proc.output.on('error', () => {});
    const onAbort = (): void => stop(new BuildFailure(BuildStatus.MiscFailure, cancelMessage(drvPath, signal)));
    if (signal.aborted) onAbort();
    else signal.addEventListener('abort', onAbort, { once: true });
    const timers: NodeJS.Timeout[] = [];
    if (timeout > 0) {
      timers.push(
        setTimeout(
          () =>
            stop(
              new BuildFailure(BuildStatus.TimedOut, `${this.goalName(req)} timed out after ${timeout} seconds`, true),
            ),
          timeout * 1000,
        ),
      );
    }
    if (maxSilent > 0) {
      const tick = Math.min(250, maxSilent * 100);
      timers.push(
        setInterval(() => {
          if (Date.now() - lastOutput >= maxSilent * 1000) {
            stop(
              new BuildFailure(
                BuildStatus.TimedOut,
                `${this.goalName(req)} timed out after ${maxSilent} seconds of silence`,
                true,
              ),
            );
          }
        }, tick),
      );
    }

    let exit: Awaited<typeof proc.exited>;
    let swept = false;
    try {
      exit = await proc.exited;
      swept = exit.swept;
    } finally {
      for (const t of timers) clearTimeout(t);
      signal.removeEventListener('abort', onAbort);
      proc.kill();
      // The wrapper already killed everything of the uid when it ended by itself; otherwise sweep /proc.
      if (!swept) await killUidProcesses(slot.uid);
      // Every writer of the pipe is dead: the output ends now (bounded wait in case of a leaked descriptor).
      await new Promise<void>((res) => {
        if (proc.output.readableEnded || proc.output.destroyed) return res();
        const t = setTimeout(() => {
          proc.output.destroy();
          res();
        }, 2000);
        proc.output.once('close', () => {
          clearTimeout(t);
          res();
        });
        proc.output.resume();
      });
      await log.close();
    }
    if (failure) return { failure };
    if (!exit.started) {
      return {
        failure: new BuildFailure(
          BuildStatus.MiscFailure,
          withLogTail(`cannot start the build sandbox for '${drvPath}'`, tail.result()),
        ),
      };
    }
    if (exit.code !== 0) {
      return {
        failure: new BuildFailure(
          b.kind === 'fixed' ? BuildStatus.TransientFailure : BuildStatus.PermanentFailure,
          withLogTail(`builder for '${drvPath}' failed with exit code ${exit.code}`, tail.result()),
        ),
      };
    }
    return {};
  }

  /**
   * The compressed copy of the log kept on the box, per user (two users may build the same drv path, and a log can
   * show private data), written to a temp name and renamed when complete.
   */
  private openLog(user: string, drvPath: string): { write(b: Buffer): void; close(): Promise<void> } {
    const dir = buildLogDir(this.config.logDir, user);
    const final = join(dir, `${baseName(drvPath)}.gz`);
    const tmp = join(dir, `.${baseName(drvPath)}.${randomBytes(6).toString('hex')}.tmp`);
    let gz: Gzip | undefined;
    let file: WriteStream | undefined;
    let broken = false;
    const opened = mkdir(dir, { recursive: true, mode: 0o750 }).then(
      () => {
        gz = createGzip();
        file = createWriteStream(tmp, { mode: 0o640 });
        gz.on('error', () => (broken = true));
        file.on('error', () => (broken = true));
        gz.pipe(file);
        for (const c of pending) gz.write(c);
        pending.length = 0;
      },
      () => {
        broken = true;
      },
    );
    const pending: Buffer[] = [];
    return {
      write: (c) => {
        if (broken) return;
        if (gz) gz.write(c);
        else pending.push(c);
      },
      close: async () => {
        await opened;
        if (!gz || !file) return;
        const f = file;
        await new Promise<void>((res) => {
          f.once('close', () => res());
          f.once('error', () => res());
          gz!.end();
        });
        if (broken) await rm(tmp, { force: true });
        else await rename(tmp, final).catch(() => rm(tmp, { force: true }));
      },
    };
  }

  /** §6.8: existence, canonicalisation, references, cycles, fixed-output hash, output checks. */
  private async postProcess(
    b: {
      req: BuildRequest;
      slot: Slot;
      signal: AbortSignal;
      kind: OutputKind;
      attrs: DerivationAttrs;
      closure: string[];
      outputs: Map<string, string>;
      fixedCa: ContentAddress | undefined;
    },
    dirs: SandboxDirs,
  ): Promise<OutputResult[]> {
    const { req, slot } = b;
    const { drvPath, user } = req;
    const reject = (msg: string): never => {
      throw new BuildFailure(BuildStatus.OutputRejected, msg);
    };
    const cancelled = (): void => {
      if (b.signal.aborted) {
        throw new BuildFailure(BuildStatus.MiscFailure, cancelMessage(drvPath, b.signal));
      }
    };
    const fsOf = new Map<string, string>();
    for (const [name, path] of b.outputs) {
      cancelled();
      const fsPath = join(dirs.storeHostDir, baseName(path));
      const st = await lstat(fsPath).catch(() => undefined);
      if (!st) reject(`builder for '${drvPath}' failed to produce output path for output '${name}' at '${path}'`);
      if ((!st!.isSymbolicLink() && (st!.mode & 0o022) !== 0) || st!.uid !== slot.uid) {
        reject(`suspicious ownership or permission on '${path}'; rejecting this build output`);
      }
      await canonicalise(fsPath, (p) => path + p.slice(fsPath.length));
      fsOf.set(name, fsPath);
    }

    // References: scan each output's NAR for the hash parts of the input closure and of the outputs.
    const byHashPart = new Map<string, string>();
    for (const p of [...b.closure, ...b.outputs.values()])
      byHashPart.set(StorePath.parse(p, this.storeDir).hashPart, p);
    const results: OutputResult[] = [];
    for (const [name, path] of b.outputs) {
      cancelled();
      const fsPath = fsOf.get(name)!;
      const scanner = new RefScanner(byHashPart.keys());
      const hasher = new NarHasher();
      for await (const chunk of dumpPath(fsPath)) {
        scanner.update(chunk);
        hasher.update(chunk);
      }
      const { narHash, narSize } = hasher.digest();
      const references = [...scanner.found()].map((h) => byHashPart.get(h)!).sort(compareBytes);
      results.push({ name, path, fsPath, narHash: new Hash('sha256', narHash), narSize, references, ca: null });
    }

    // Cycles between outputs.
    const outPaths = new Map([...b.outputs].map(([n, p]) => [p, n]));
    const byName = new Map(results.map((r) => [r.name, r]));
    const state = new Map<string, 1 | 2>();
    const visit = (r: OutputResult, parent: OutputResult | undefined): void => {
      const s = state.get(r.name);
      if (s === 2) return;
      if (s === 1) {
        reject(
          `cycle detected in build of '${drvPath}' in the references of output '${r.name}' from output '${parent!.name}'`,
        );
      }
      state.set(r.name, 1);
      for (const ref of r.references) {
        const n = outPaths.get(ref);
        if (n !== undefined && n !== r.name) visit(byName.get(n)!, r);
      }
      state.set(r.name, 2);
    };
    for (const r of results) visit(r, undefined);

    // Fixed-output hash.
    if (b.kind === 'fixed') {
      const expected = b.fixedCa!;
      const r = results[0]!;
      const st = await lstat(r.fsPath);
      let actual: Hash;
      if (expected.method === 'flat' || expected.method === 'text') {
        if (!st.isFile() || (st.mode & 0o100) !== 0) {
          reject(
            `output path '${r.path}' should be a non-executable regular file since recursive hashing is not enabled (outputHashMode=flat)`,
          );
        }
        actual = new HashSink(expected.hash.algo).update(await readFile(r.fsPath)).finish().hash;
      } else if (expected.hash.algo === 'sha256') {
        actual = r.narHash;
      } else {
        const sink = new HashSink(expected.hash.algo);
        for await (const chunk of dumpPath(r.fsPath)) sink.update(chunk);
        actual = sink.finish().hash;
      }
      const mismatch = checkFixedOutputHash(drvPath, expected, actual);
      if (mismatch) reject(mismatch);
      const refs = r.references.filter((p) => p !== r.path);
      if (r.references.length > 0) {
        reject(
          `fixed-output derivations must not reference store paths: '${drvPath}' references '${refs[0] ?? r.path}'`,
        );
      }
      r.ca = renderContentAddress({ method: expected.method, hash: actual });
    }

    this.checkOutputs(b, results, user);
    return results;
  }

  /** `allowedReferences` / `allowedRequisites` / `disallowedReferences` / `disallowedRequisites` (+ structured checks). */
  private checkOutputs(
    b: { req: BuildRequest; attrs: DerivationAttrs; outputs: Map<string, string> },
    results: OutputResult[],
    user: string,
  ): void {
    const { attrs } = b;
    const byPath = new Map(results.map((r) => [r.path, r]));
    const closureCache = new Map<string, Set<string>>();
    const closureOf = (r: OutputResult): Set<string> => {
      const cached = closureCache.get(r.path);
      if (cached) return cached;
      const out = new Set<string>();
      const todo = [r.path];
      const inputs: string[] = [];
      while (todo.length > 0) {
        const p = todo.pop()!;
        if (out.has(p)) continue;
        out.add(p);
        const o = byPath.get(p);
        if (o) todo.push(...o.references);
        else inputs.push(p);
      }
      for (const p of this.store.queryClosure(user, inputs)) out.add(p);
      closureCache.set(r.path, out);
      return out;
    };
    const resolve = (spec: string[]): Set<string> => {
      const s = new Set<string>();
      for (const x of spec) s.add(b.outputs.get(x) ?? x);
      return s;
    };
    interface Checks {
      allowedReferences?: string[];
      allowedRequisites?: string[];
      disallowedReferences?: string[];
      disallowedRequisites?: string[];
      maxSize?: number;
      maxClosureSize?: number;
      ignoreSelfRefs: boolean;
    }
    const perOutput = (name: string): Checks | undefined => {
      if (!attrs.structured) {
        return {
          allowedReferences: attrs.getStrings('allowedReferences'),
          allowedRequisites: attrs.getStrings('allowedRequisites'),
          disallowedReferences: attrs.getStrings('disallowedReferences'),
          disallowedRequisites: attrs.getStrings('disallowedRequisites'),
          ignoreSelfRefs: false,
        };
      }
      const oc = attrs.structured.outputChecks;
      if (oc === null || typeof oc !== 'object') return undefined;
      const c = (oc as Record<string, unknown>)[name];
      if (c === null || typeof c !== 'object') return undefined;
      const o = c as Record<string, unknown>;
      const list = (k: string): string[] | undefined =>
        Array.isArray(o[k]) ? (o[k] as unknown[]).filter((x): x is string => typeof x === 'string') : undefined;
      return {
        allowedReferences: list('allowedReferences'),
        allowedRequisites: list('allowedRequisites'),
        disallowedReferences: list('disallowedReferences'),
        disallowedRequisites: list('disallowedRequisites'),
        maxSize: typeof o.maxSize === 'number' ? o.maxSize : undefined,
        maxClosureSize: typeof o.maxClosureSize === 'number' ? o.maxClosureSize : undefined,
        ignoreSelfRefs: o.ignoreSelfRefs === true,
      };
    };
    for (const r of results) {
      const c = perOutput(r.name);
      if (!c) continue;
      if (c.maxSize !== undefined && r.narSize > c.maxSize) {
        throw new BuildFailure(
          BuildStatus.OutputRejected,
          `path '${r.path}' is too large at ${r.narSize} bytes; limit is ${c.maxSize} bytes`,
        );
      }
      if (c.maxClosureSize !== undefined) {
        let size = 0;
        for (const p of closureOf(r)) size += byPath.get(p)?.narSize ?? this.store.queryPathInfo(user, p)?.narSize ?? 0;
        if (size > c.maxClosureSize) {
          throw new BuildFailure(
            BuildStatus.OutputRejected,
            `closure of path '${r.path}' is too large at ${size} bytes; limit is ${c.maxClosureSize} bytes`,
          );
        }
      }
      const check = (spec: string[] | undefined, allowed: boolean, recursive: boolean): void => {
        if (spec === undefined) return;
        const set = resolve(spec);
        const used = new Set(recursive ? closureOf(r) : r.references);
        if (recursive && c.ignoreSelfRefs) used.delete(r.path);
        const bad = [...used].filter((p) => (allowed ? !set.has(p) : set.has(p))).sort(compareBytes);
        if (bad.length > 0) {
          throw new BuildFailure(
            BuildStatus.OutputRejected,
            `output '${r.path}' is not allowed to refer to the following paths:${bad.map((p) => `\n  ${p}`).join('')}`,
          );
        }
      };
      check(c.allowedReferences, true, false);
      check(c.allowedRequisites, true, true);
      check(c.disallowedReferences, false, false);
      check(c.disallowedRequisites, false, true);
    }
  }
}
