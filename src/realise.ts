/**
 * Realising derived paths for a user (worker `BuildPaths` / `BuildPathsWithResults` / `QueryMissing`, serve
 * `BuildPaths`): parse DerivedPath strings (§1.3), read the `.drv` closure from the user's view of the store, **verify**
 * it (every `.drv` is the text path of its canonical ATerm, and every claimed output path is what the derivation graph
 * hashes to, §5.5), build the input derivations first (each once, in dependency order) and then each requested
 * derivation as a BasicDerivation with `verified: true`. The builder makes the outputs of a verified build public
 * (and signed by the box) when all its inputs are public (trust model, case 3); another user then finds them valid
 * and nothing is rebuilt.
 */
import { type BuildRequest, type BuildResult, BuildStatus } from './build.js';
import {
  type BasicDerivation,
  computeOutputPaths,
  type Derivation,
  type DrvHashCache,
  derivationKind,
  derivationPath,
  drvNameFromPath,
  drvOutputId,
  hashDerivationModulo,
  parseDerivation,
  printDerivation,
  realisationJson,
} from './derivation.js';
import type { Hash } from './hash.js';
import type { Session } from './session.js';
import { nameError, StorePath } from './store-path.js';

export function isSuccessStatus(status: number): boolean {
  return status === 0 || status === 1 || status === 2 || status === 13;
}

/** Largest `.drv` file read from the store. */
const MAX_DRV_SIZE = 64 * 1024 * 1024;

export class DerivedPathError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'DerivedPathError';
  }
}

/** A store path to make valid, or outputs of a derivation to build. `raw` is the string the client sent. */
export type DerivedPath =
  | { kind: 'opaque'; raw: string; path: string }
  | { kind: 'built'; raw: string; drvPath: string; outputs: '*' | string[] };

/**
 * Parse a DerivedPath string: `<path>`, `<drv>!<out1>,<out2>` or `<drv>!*` (worker ≥ 1.30). With `legacy` (older
 * worker clients and the serve protocol) the StorePathWithOutputs syntax applies: a bare `.drv` path means "all its
 * outputs".
 */
export function parseDerivedPath(s: string, storeDir: string, legacy = false): DerivedPath {
  const bang = s.indexOf('!');
  const parsePath = (p: string): StorePath => {
    try {
      return StorePath.parse(p, storeDir);
    } catch (e) {
      throw new DerivedPathError((e as Error).message);
    }
  };
  if (bang < 0) {
    const sp = parsePath(s);
    if (legacy && sp.isDerivation) return { kind: 'built', raw: s, drvPath: s, outputs: '*' };
    return { kind: 'opaque', raw: s, path: s };
  }
  const drvPath = s.slice(0, bang);
  const rest = s.slice(bang + 1);
  if (!parsePath(drvPath).isDerivation) {
    throw new DerivedPathError(`'${s}': outputs can only be requested of a derivation ('${drvPath}' is none)`);
  }
  if (rest.includes('!')) {
    throw new DerivedPathError(`'${s}': outputs of dynamic derivations are not supported by buildbox`);
  }
  if (rest === '*' || (legacy && rest === '')) return { kind: 'built', raw: s, drvPath, outputs: '*' };
  const outputs = rest.split(',');
  for (const o of outputs) {
    const err = nameError(o);
    if (err !== undefined) throw new DerivedPathError(`'${s}': invalid output name '${o}': ${err}`);
  }
  return { kind: 'built', raw: s, drvPath, outputs: [...new Set(outputs)].sort() };
}

/** Where the messages of one build go (the worker protocol turns them into a build activity). */
export interface BuildLogSink {
  /** Builder output, live. */
  log(chunk: Buffer): void;
  /** Box messages about this build (queue position…). */
  notice(msg: string): void;
  /** The build ended (the sink is not used afterwards). */
  done(): void;
}

export interface RealiseOptions {
  options: BuildRequest['options'];
  /** Messages to the client that concern no single build (e.g. "already valid, not rebuilt"). */
  notice(msg: string): void;
  /** A derivation is about to be handed to the builder: where its log goes. */
  startBuild(drvPath: string): BuildLogSink;
}

export interface KeyedBuildResult {
  /** The derived path as the client sent it. */
  path: string;
  result: BuildResult;
}

function failure(status: number, errorMsg: string): BuildResult {
  const now = Math.floor(Date.now() / 1000);
  return {
    status,
    errorMsg,
    timesBuilt: 0,
    isNonDeterministic: false,
    startTime: now,
    stopTime: now,
    builtOutputs: new Map(),
  };
}

function alreadyValid(builtOutputs: Map<string, string>): BuildResult {
  const r = failure(BuildStatus.AlreadyValid, '');
  r.builtOutputs = builtOutputs;
  return r;
}

class RealiseError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'RealiseError';
  }
}

/**
 * The `.drv` files of one request, read from the user's view: parsing, verification and hashes are memoised, so a
 * derivation shared by several requested paths is read, verified and built once.
 */
class DrvGraph {
  private readonly drvs = new Map<string, Derivation>();
  private readonly verified = new Map<string, RealiseError | true>();
  private readonly hashCache: DrvHashCache = new Map();
  private readonly masked = new Map<string, Map<string, Hash>>();

  constructor(
    private readonly s: Session,
    private readonly storeDir: string,
  ) {}

  /** The parsed derivation, or undefined if it is not valid in the user's view. Throws if it does not parse. */
  load = (drvPath: string): Derivation | undefined => {
    const cached = this.drvs.get(drvPath);
    if (cached) return cached;
    let data: Buffer | undefined;
    try {
      data = this.s.store.readRegularFile(this.s.user, drvPath, MAX_DRV_SIZE);
    } catch (e) {
      throw new RealiseError(`cannot read derivation: ${(e as Error).message}`);
    }
    if (data === undefined) return undefined;
    const text = data.toString('latin1');
    let drv: Derivation;
    try {
      drv = parseDerivation(text, drvNameFromPath(drvPath, this.storeDir), { storeDir: this.storeDir });
    } catch (e) {
      throw new RealiseError(`cannot read derivation '${drvPath}': ${(e as Error).message}`);
    }
    // Nix writes .drv files in canonical form; anything else could claim an output path its parse would hide.
    if (printDerivation(drv) !== text) {
      throw new RealiseError(`derivation '${drvPath}' is not in the canonical form Nix writes; refusing to build it`);
    }
    this.drvs.set(drvPath, drv);
    return drv;
  };

  /** The parsed derivation; a clear error if it is not in the user's view. */
  get(drvPath: string): Derivation {
    const drv = this.load(drvPath);
    if (!drv) {
      throw new RealiseError(
        `derivation '${drvPath}' is not valid on the box for you; copy the .drv closure first (nix copy --derivation)`,
      );
    }
    return drv;
  }

  /**
   * Verify `drvPath` and its whole input closure: each `.drv` path is the text path of its contents, and each output
   * path (and the env variable of the same name) is the one the derivation graph hashes to. Throws RealiseError.
   */
  verify(drvPath: string, stack: string[] = []): Derivation {
    const state = this.verified.get(drvPath);
    if (state instanceof RealiseError) throw state;
    const drv = this.get(drvPath);
    if (state === true) return drv;
    if (stack.includes(drvPath)) throw new RealiseError(`cycle in input derivations through '${drvPath}'`);
    try {
      const fail = (why: string): never => {
        throw new RealiseError(`derivation '${drvPath}' does not verify: ${why}; refusing to build it`);
      };
      let kind: string;
      try {
        kind = derivationKind(drv);
      } catch (e) {
        return fail((e as Error).message);
      }
      if (kind !== 'inputAddressed' && kind !== 'fixed') {
        fail(`it has ${kind} outputs, which buildbox does not build (only input-addressed and fixed-output ones)`);
      }
      const ownPath = derivationPath(drv, this.storeDir);
      if (ownPath !== drvPath) fail(`its contents belong at '${ownPath}'`);
      for (const [input, outs] of drv.inputDrvs) {
        const inDrv = this.verify(input, [...stack, drvPath]);
        for (const o of outs) {
          if (!inDrv.outputs.has(o)) fail(`its input derivation '${input}' has no output '${o}'`);
        }
      }
      let expected: Map<string, string>;
      try {
        expected = computeOutputPaths(drv, this.load, this.storeDir, this.hashCache);
      } catch (e) {
        return fail((e as Error).message);
      }
      for (const [name, out] of drv.outputs) {
        const want = expected.get(name);
        if (out.path !== want) fail(`output '${name}' is claimed at '${out.path}' but hashes to '${want}'`);
        if (drv.env.get(name) !== want) fail(`its environment variable '${name}' is not the output path '${want}'`);
      }
      this.verified.set(drvPath, true);
      return drv;
    } catch (e) {
      const err = e instanceof RealiseError ? e : new RealiseError((e as Error).message);
      this.verified.set(drvPath, err);
      throw err;
    }
  }

  /** `drvOutputId → realisation JSON` for the given outputs of a verified derivation. */
  builtOutputs(drvPath: string, outputs: Iterable<string>): Map<string, string> {
    const drv = this.get(drvPath);
    let hashes = this.masked.get(drvPath);
    if (!hashes) {
      hashes = hashDerivationModulo(drv, true, this.load, { storeDir: this.storeDir, cache: this.hashCache });
      this.masked.set(drvPath, hashes);
    }
    const out = new Map<string, string>();
    for (const o of outputs) {
      const h = hashes.get(o);
      const p = drv.outputs.get(o)?.path;
      if (!h || !p) continue;
      const id = drvOutputId(h, o);
      out.set(id, realisationJson({ id, outPath: p }));
    }
    return out;
  }
}

/**
 * Realise `paths` for the session's user. Never throws for build or verification failures: each derived path gets
 * its BuildResult (failures have a clear `errorMsg`; a failed input derivation gives DependencyFailed).
 */
export async function realise(s: Session, paths: DerivedPath[], opts: RealiseOptions): Promise<KeyedBuildResult[]> {
  const r = new Realiser(s, opts);
  const out: KeyedBuildResult[] = [];
  for (const p of paths) out.push({ path: p.raw, result: await r.realisePath(p) });
  return out;
}

class Realiser {
  private readonly storeDir: string;
  private readonly graph: DrvGraph;
  /** Builds started by this request, by `.drv` path. */
  private readonly builds = new Map<string, Promise<BuildResult>>();

  constructor(
    private readonly s: Session,
    private readonly opts: RealiseOptions,
  ) {
    this.storeDir = s.store.storeDir;
    this.graph = new DrvGraph(s, this.storeDir);
  }

  async realisePath(p: DerivedPath): Promise<BuildResult> {
    if (p.kind === 'opaque') {
      if (this.s.store.isValidPath(this.s.user, p.path)) {
        this.s.store.addTempRoot(this.s.id, p.path);
        return alreadyValid(new Map());
      }
      return failure(
        BuildStatus.MiscFailure,
        `path '${p.path}' is not valid on the box, and buildbox does not substitute; copy it to the box first`,
      );
    }
    const res = await this.realiseDrv(p.drvPath, p.outputs, true);
    return res;
  }

  /** Make `outputs` of `drvPath` valid in the user's view: nothing if they are, else build (once). */
  private async realiseDrv(drvPath: string, outputs: '*' | string[], top: boolean): Promise<BuildResult> {
    let drv: Derivation;
    try {
      drv = this.graph.verify(drvPath);
    } catch (e) {
      return failure(BuildStatus.MiscFailure, (e as Error).message);
    }
    const wanted = outputs === '*' ? [...drv.outputs.keys()] : outputs;
    for (const o of wanted) {
      if (!drv.outputs.has(o)) {
        return failure(BuildStatus.MiscFailure, `derivation '${drvPath}' does not have an output named '${o}'`);
      }
    }
    const wantedPaths = wanted.map((o) => drv.outputs.get(o)!.path);
    const store = this.s.store;
    if (wantedPaths.every((p) => store.isValidPath(this.s.user, p))) {
      for (const p of wantedPaths) store.addTempRoot(this.s.id, p);
      if (top) this.opts.notice(this.notRebuilt(drvPath, wantedPaths));
      return alreadyValid(this.graph.builtOutputs(drvPath, wanted));
    }
    let pending = this.builds.get(drvPath);
    if (!pending) {
      pending = this.build(drvPath, drv);
      this.builds.set(drvPath, pending);
    }
    const res = await pending;
    if (!isSuccessStatus(res.status)) return res;
    if (res.status === BuildStatus.AlreadyValid && top) this.opts.notice(this.notRebuilt(drvPath, wantedPaths));
    return { ...res, builtOutputs: this.graph.builtOutputs(drvPath, wanted) };
  }

  private notRebuilt(drvPath: string, outPaths: string[]): string {
    const descs = new Set<string>();
    for (const p of outPaths) {
      const info = this.s.store.queryPathInfo(this.s.user, p);
      if (!info) continue;
      if (info.scope === 'public') {
        const keys = info.sigs.map((sig) => sig.slice(0, Math.max(0, sig.indexOf(':'))));
        descs.add(keys.length > 0 ? `public, signed by ${[...new Set(keys)].join(', ')}` : 'public');
      } else descs.add('in your own store view');
    }
    const what = outPaths.length === 1 ? `'${outPaths[0]}' is` : `the outputs of '${drvPath}' are`;
    return `${what} already valid on the box (${[...descs].join('; ')}); not rebuilt`;
  }

  /** Build the inputs, then `drvPath` itself as a BasicDerivation. */
  private async build(drvPath: string, drv: Derivation): Promise<BuildResult> {
    const store = this.s.store;
    const inputs = new Set(drv.inputSrcs);
    for (const [input, outs] of drv.inputDrvs) {
      if (this.s.signal.aborted) return failure(BuildStatus.MiscFailure, 'the client went away; build cancelled');
      const res = await this.realiseDrv(input, outs, false);
      if (!isSuccessStatus(res.status)) {
        const why = res.errorMsg ? `: ${res.errorMsg}` : '';
        return failure(
          BuildStatus.DependencyFailed,
          `cannot build '${drvPath}': its dependency '${input}' failed${why}`,
        );
      }
      const inDrv = this.graph.get(input);
      for (const o of outs) inputs.add(inDrv.outputs.get(o)!.path);
    }
    if (this.s.signal.aborted) return failure(BuildStatus.MiscFailure, 'the client went away; build cancelled');
    for (const p of inputs) {
      if (!store.isValidPath(this.s.user, p)) {
        return failure(
          BuildStatus.MiscFailure,
          `dependency '${p}' of '${drvPath}' is not valid on the box for you; copy it to the box first`,
        );
      }
    }
    const closure = store.queryClosure(this.s.user, inputs);
    const basic: BasicDerivation = {
      name: drv.name,
      outputs: drv.outputs,
      inputSrcs: closure,
      platform: drv.platform,
      builder: drv.builder,
      args: drv.args,
      env: drv.env,
    };
    const sink = this.opts.startBuild(drvPath);
    let res: BuildResult;
    try {
      res = await this.s.builder.build({
        user: this.s.user,
        drvPath,
        drv: basic,
        verified: true,
        options: this.opts.options,
        log: (chunk) => sink.log(chunk),
        notice: (msg) => sink.notice(msg),
        signal: this.s.signal,
      });
    } catch (e) {
      res = failure(BuildStatus.MiscFailure, `building '${drvPath}' failed: ${(e as Error).message}`);
    }
    sink.done();
    if (isSuccessStatus(res.status)) {
      for (const o of drv.outputs.values())
        if (store.isValidPath(this.s.user, o.path)) store.addTempRoot(this.s.id, o.path);
    }
    return res;
  }
}

export interface MissingPaths {
  willBuild: string[];
  willSubstitute: string[];
  unknown: string[];
  downloadSize: number;
  narSize: number;
}

/**
 * What realising `paths` would do (worker `QueryMissing`): derivations to build (whose wanted outputs are not valid
 * in the user's view), and paths the box does not know and cannot substitute. The box never substitutes.
 */
export function queryMissing(s: Session, paths: DerivedPath[]): MissingPaths {
  const graph = new DrvGraph(s, s.store.storeDir);
  const willBuild = new Set<string>();
  const unknown = new Set<string>();
  const valid = (p: string) => s.store.isValidPath(s.user, p);
  const visit = (drvPath: string, outputs: '*' | string[]) => {
    if (!valid(drvPath)) {
      unknown.add(drvPath);
      return;
    }
    let drv: Derivation;
    try {
      drv = graph.verify(drvPath);
    } catch {
      unknown.add(drvPath);
      return;
    }
    const wanted = outputs === '*' ? [...drv.outputs.keys()] : outputs;
    const paths = wanted.map((o) => drv.outputs.get(o)?.path);
    if (paths.every((p) => p !== undefined && valid(p))) return;
    if (willBuild.has(drvPath)) return;
    willBuild.add(drvPath);
    for (const [input, outs] of drv.inputDrvs) visit(input, outs);
    for (const src of drv.inputSrcs) if (!valid(src)) unknown.add(src);
  };
  for (const p of paths) {
    if (p.kind === 'opaque') {
      if (!valid(p.path)) unknown.add(p.path);
    } else visit(p.drvPath, p.outputs);
  }
  return {
    willBuild: [...willBuild].sort(),
    willSubstitute: [],
    unknown: [...unknown].sort(),
    downloadSize: 0,
    narSize: 0,
  };
}

/**
 * Output name → output path of a derivation in the user's view (worker `QueryDerivationOutputMap`), as the `.drv`
 * declares them ('' for outputs whose path is only known after the build).
 */
export function derivationOutputMap(s: Session, drvPath: string): Map<string, string> {
  const drv = new DrvGraph(s, s.store.storeDir).get(drvPath);
  const out = new Map<string, string>();
  for (const [name, o] of [...drv.outputs].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) out.set(name, o.path);
  return out;
}
