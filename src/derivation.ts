/**
 * Derivations (spec §5.5, §6.1–6.3): the ATerm `.drv` format (byte-exact parser and printer), the BasicDerivation
 * wire form, output kinds, hash modulo, output paths, DrvOutput ids and realisations, fixed-output checks, and the
 * attributes a builder needs (`requiredSystemFeatures`, structured attrs).
 *
 * Every string in a derivation (names, paths, args, env keys and values) is a latin1 JS string: one char per byte,
 * so arbitrary bytes round-trip. Convert with `Buffer.from(s, 'latin1')` where bytes are needed.
 */
import { Hash, type HashAlgo, type HashError, sha256 } from './hash.js';
import { encode as nix32 } from './nix32.js';
import {
  type ContentAddress,
  type ContentAddressMethod,
  compareBytes,
  DEFAULT_STORE_DIR,
  makeFixedOutputPath,
  makeOutputPath,
  makeTextPath,
  nameError,
  outputPathName,
  parseMethodAlgo,
  renderMethodAlgo,
  StorePath,
} from './store-path.js';
import type { WireReader, WireWriter } from './wire.js';

export interface DerivationOutput {
  /** Full store path, or '' for floating / deferred / impure outputs. */
  path: string;
  /** '' (input-addressed or deferred), or `[r:|text:|git:]<algo>`. */
  methodAlgo: string;
  /** '' , lower-case base16 (fixed), or 'impure'. */
  hash: string;
}

export interface BasicDerivation {
  /** Derivation name (the `.drv` file's name without `.drv`). */
  name: string;
  outputs: Map<string, DerivationOutput>;
  inputSrcs: string[];
  platform: string;
  builder: string;
  args: string[];
  env: Map<string, string>;
}

export interface Derivation extends BasicDerivation {
  /** Input `.drv` path → names of the outputs used. */
  inputDrvs: Map<string, string[]>;
}

export class DerivationError extends Error {
  constructor(
    message: string,
    readonly offset?: number,
  ) {
    super(offset === undefined ? message : `${message} (at byte ${offset})`);
    this.name = 'DerivationError';
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Output kinds (§6.3)

export type OutputKind = 'inputAddressed' | 'fixed' | 'floating' | 'deferred' | 'impure';

/** Classify one output tuple; throws if the tuple is malformed. */
export function outputKind(o: DerivationOutput): OutputKind {
  if (o.methodAlgo !== '') {
    if (o.hash === 'impure') return 'impure';
    if (o.hash !== '') return 'fixed';
    return 'floating';
  }
  if (o.hash !== '') throw new DerivationError(`output has a hash '${o.hash}' but no hash algorithm`);
  return o.path === '' ? 'deferred' : 'inputAddressed';
}

/** The kind of a whole derivation. Kinds may not be mixed; a fixed output must be the only one and named `out`. */
export function derivationKind(drv: BasicDerivation): OutputKind {
  const kinds = new Map<OutputKind, string[]>();
  for (const [name, o] of drv.outputs) {
    let k: OutputKind;
    try {
      k = outputKind(o);
    } catch (e) {
      throw new DerivationError(`derivation '${drv.name}': output '${name}': ${(e as Error).message}`);
    }
    const l = kinds.get(k);
    if (l) l.push(name);
    else kinds.set(k, [name]);
  }
  if (kinds.size === 0) throw new DerivationError(`derivation '${drv.name}' must have at least one output`);
  if (kinds.size > 1) {
    const desc = [...kinds].map(([k, names]) => `${names.join(', ')}: ${k}`).join('; ');
    throw new DerivationError(`derivation '${drv.name}' can't mix derivation output types (${desc})`);
  }
  const [kind, names] = [...kinds][0]!;
  if (kind === 'fixed') {
    if (names.length > 1) throw new DerivationError(`derivation '${drv.name}': only one fixed output is allowed`);
    if (names[0] !== 'out') {
      throw new DerivationError(`derivation '${drv.name}': single fixed output must be named "out", not "${names[0]}"`);
    }
  }
  if (kind === 'floating') {
    const algos = new Set([...drv.outputs.values()].map((o) => parseMethodAlgo(o.methodAlgo).algo));
    if (algos.size > 1) {
      throw new DerivationError(`derivation '${drv.name}': all floating outputs must use the same hash algorithm`);
    }
  }
  return kind;
}

export function isFixedOutput(drv: BasicDerivation): boolean {
  return derivationKind(drv) === 'fixed';
}

/** Content-addressed derivations (fixed, floating, impure) are the ones untrusted worker clients may build. */
export function isContentAddressed(drv: BasicDerivation): boolean {
  const k = derivationKind(drv);
  return k === 'fixed' || k === 'floating' || k === 'impure';
}

/** Sandboxed = private network and pure: everything except fixed-output and impure derivations. */
export function isSandboxed(drv: BasicDerivation): boolean {
  const k = derivationKind(drv);
  return k !== 'fixed' && k !== 'impure';
}

/** The declared content address of a fixed-output derivation's `out`, or undefined for other kinds. */
export function fixedOutputCa(drv: BasicDerivation): ContentAddress | undefined {
  if (derivationKind(drv) !== 'fixed') return undefined;
  const o = drv.outputs.get('out')!;
  const { method, algo } = parseMethodAlgo(o.methodAlgo);
  return { method, hash: Hash.parse(o.hash, algo) };
}

// ---------------------------------------------------------------------------------------------------------------
// Validation shared by the ATerm parser and the wire reader

function checkPath(what: string, p: string, storeDir: string): string {
  try {
    StorePath.parse(p, storeDir);
  } catch (e) {
    throw new DerivationError(`${what}: ${(e as Error).message}`);
  }
  return p;
}

/**
 * Check an output tuple and normalise it the way Nix does when it reads one: a fixed output's hash is re-encoded as
 * base16 and its path recomputed from method, hash and name (a path claimed by the sender is ignored, §6.2).
 */
function normaliseOutput(drvName: string, outName: string, o: DerivationOutput, storeDir: string): DerivationOutput {
  const where = `derivation '${drvName}', output '${outName}'`;
  const err = nameError(outName);
  if (err !== undefined) throw new DerivationError(`${where}: invalid output name: ${err}`);
  const pathErr = nameError(outputPathName(drvName, outName));
  if (pathErr !== undefined) throw new DerivationError(`${where}: invalid output path name: ${pathErr}`);
  let kind: OutputKind;
  try {
    kind = outputKind(o);
  } catch (e) {
    throw new DerivationError(`${where}: ${(e as Error).message}`);
  }
  const methodAlgo = (): { method: ContentAddressMethod; algo: HashAlgo } => {
    try {
      return parseMethodAlgo(o.methodAlgo);
    } catch (e) {
      throw new DerivationError(`${where}: ${(e as Error).message}`);
    }
  };
  switch (kind) {
    case 'inputAddressed':
      return { path: checkPath(where, o.path, storeDir), methodAlgo: '', hash: '' };
    case 'deferred':
      return { ...o };
    case 'fixed': {
      if (!o.path.startsWith('/')) throw new DerivationError(`${where}: bad path '${o.path}'`);
      const { method, algo } = methodAlgo();
      let hash: Hash;
      try {
        hash = Hash.parse(o.hash, algo);
      } catch (e) {
        throw new DerivationError(`${where}: ${(e as HashError).message}`);
      }
      let path: string;
      try {
        path = makeFixedOutputPath(outputPathName(drvName, outName), { method, hash }, [], false, storeDir);
      } catch (e) {
        throw new DerivationError(`${where}: ${(e as Error).message}`);
      }
      return { path, methodAlgo: renderMethodAlgo(method, algo), hash: hash.toBase16() };
    }
    case 'floating':
    case 'impure':
      methodAlgo();
      if (o.path !== '') throw new DerivationError(`${where}: a ${kind} output must not have a path ('${o.path}')`);
      return { ...o };
  }
}

function validateDerivation(drv: BasicDerivation, storeDir: string): void {
  const nerr = nameError(`${drv.name}.drv`);
  if (nerr !== undefined) throw new DerivationError(`invalid derivation name '${drv.name}': ${nerr}`);
  for (const [name, o] of drv.outputs) drv.outputs.set(name, normaliseOutput(drv.name, name, o, storeDir));
  derivationKind(drv);
  for (const p of drv.inputSrcs) checkPath(`derivation '${drv.name}', input source`, p, storeDir);
  const inputDrvs = (drv as Partial<Derivation>).inputDrvs;
  if (inputDrvs) {
    for (const [p, outs] of inputDrvs) {
      const sp = StorePath.parse(checkPath(`derivation '${drv.name}', input derivation`, p, storeDir), storeDir);
      if (!sp.isDerivation) {
        throw new DerivationError(`derivation '${drv.name}': input derivation '${p}' does not end in .drv`);
      }
      for (const o of outs) {
        const e = nameError(o);
        if (e !== undefined) {
          throw new DerivationError(`derivation '${drv.name}': input derivation '${p}', output '${o}': ${e}`);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// ATerm parser (§6.1)

export interface ParseOptions {
  storeDir?: string;
}

const QUOTE_OR_BACKSLASH = /["\\]/g;

class ATermParser {
  pos = 0;
  constructor(
    readonly s: string,
    readonly name: string,
  ) {}

  fail(what: string, at = this.pos): never {
    throw new DerivationError(`invalid derivation '${this.name}': ${what}`, at);
  }

  expect(token: string): void {
    if (!this.s.startsWith(token, this.pos)) {
      const got = this.pos >= this.s.length ? 'end of file' : JSON.stringify(this.s.slice(this.pos, this.pos + 10));
      this.fail(`expected '${token}', got ${got}`);
    }
    this.pos += token.length;
  }

  /** True (and consumes it) if the next char is `c`. */
  eat(c: string): boolean {
    if (this.s[this.pos] === c) {
      this.pos++;
      return true;
    }
    return false;
  }

  string(): string {
    const start = this.pos;
    this.expect('"');
    const s = this.s;
    const re = QUOTE_OR_BACKSLASH;
    let out = '';
    let from = this.pos;
    for (;;) {
      // Jump to the next quote or backslash.
      re.lastIndex = from;
      const m = re.exec(s);
      if (!m) this.fail('unterminated string', start);
      const at = m.index;
      out += s.slice(from, at);
      if (m[0] === '"') {
        this.pos = at + 1;
        return out;
      }
      const c = s[at + 1];
      if (c === undefined) this.fail('unterminated string', start);
      out += c === 'n' ? '\n' : c === 'r' ? '\r' : c === 't' ? '\t' : c;
      from = at + 2;
    }
  }

  path(what: string): string {
    const at = this.pos;
    const p = this.string();
    if (!p.startsWith('/')) this.fail(`${what} '${p}' is not an absolute path`, at);
    return p;
  }

  /** `[ item, item, … ]` */
  list(item: () => void): void {
    this.expect('[');
    if (this.eat(']')) return;
    for (;;) {
      item();
      if (this.eat(']')) return;
      this.expect(',');
    }
  }

  strings(): string[] {
    const out: string[] = [];
    this.list(() => out.push(this.string()));
    return out;
  }
}

/**
 * Parse a `.drv` file (latin1 string, one char per byte). `name` is the derivation name (file name without the hash
 * part and `.drv`, see `drvNameFromPath`). Errors give the byte offset.
 */
export function parseDerivation(text: string, name: string, opts: ParseOptions = {}): Derivation {
  const storeDir = opts.storeDir ?? DEFAULT_STORE_DIR;
  for (let i = 0; i < text.length; i++) {
    if (text.charCodeAt(i) > 0xff) {
      throw new DerivationError(
        `invalid derivation '${name}': character beyond latin1 (decode .drv files as latin1)`,
        i,
      );
    }
  }
  const p = new ATermParser(text, name);
  if (text.startsWith('DrvWithVersion(')) {
    p.fail('versioned derivations (experimental dynamic derivations) are not supported');
  }
  p.expect('Derive(');

  const outputs = new Map<string, DerivationOutput>();
  p.list(() => {
    p.expect('(');
    const at = p.pos;
    const outName = p.string();
    p.expect(',');
    const path = p.string();
    p.expect(',');
    const methodAlgo = p.string();
    p.expect(',');
    const hash = p.string();
    p.expect(')');
    if (outputs.has(outName)) p.fail(`duplicate output '${outName}'`, at);
    if (path !== '' && !path.startsWith('/')) p.fail(`output path '${path}' is not an absolute path`, at);
    outputs.set(outName, { path, methodAlgo, hash });
  });
  p.expect(',');

  const inputDrvs = new Map<string, string[]>();
  p.list(() => {
    p.expect('(');
    const at = p.pos;
    const drvPath = p.path('input derivation');
    p.expect(',');
    const outs = p.strings();
    p.expect(')');
    if (inputDrvs.has(drvPath)) p.fail(`duplicate input derivation '${drvPath}'`, at);
    if (new Set(outs).size !== outs.length) p.fail(`duplicate output name in input derivation '${drvPath}'`, at);
    inputDrvs.set(drvPath, outs);
  });
  p.expect(',');

  const inputSrcs: string[] = [];
  p.list(() => inputSrcs.push(p.path('input source')));
  if (new Set(inputSrcs).size !== inputSrcs.length) p.fail('duplicate input source');
  p.expect(',');
  const platform = p.string();
  p.expect(',');
  const builder = p.string();
  p.expect(',');
  const args = p.strings();
  p.expect(',');

  const env = new Map<string, string>();
  p.list(() => {
    p.expect('(');
    const at = p.pos;
    const k = p.string();
    p.expect(',');
    const v = p.string();
    p.expect(')');
    if (env.has(k)) p.fail(`duplicate environment variable '${k}'`, at);
    env.set(k, v);
  });
  p.expect(')');
  if (p.pos !== text.length) p.fail('unexpected data after the end of the derivation');

  const drv: Derivation = { name, outputs, inputDrvs, inputSrcs, platform, builder, args, env };
  validateDerivation(drv, storeDir);
  return drv;
}

// ---------------------------------------------------------------------------------------------------------------
// ATerm printer

const ESCAPE_RE = /["\\\n\r\t]/g;
const ESCAPES: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t' };

function quote(s: string): string {
  return `"${s.replace(ESCAPE_RE, (c) => ESCAPES[c]!)}"`;
}

function quoteRaw(s: string): string {
  return `"${s}"`;
}

function sortedUnique(xs: Iterable<string>): string[] {
  return [...new Set(xs)].sort(compareBytes);
}

export interface PrintOptions {
  /** Blank output paths and the env entries named after outputs (hash modulo, §5.5). */
  maskOutputs?: boolean;
  /** Print this instead of `drv.inputDrvs` (hash modulo uses hashes of the inputs as keys). */
  inputDrvs?: Map<string, Iterable<string>>;
}

/** Print a derivation in the ATerm format exactly as Nix does (sorted, escaped, no trailing newline). */
export function printDerivation(drv: BasicDerivation | Derivation, opts: PrintOptions = {}): string {
  const mask = opts.maskOutputs === true;
  const parts: string[] = ['Derive(['];
  const outNames = [...drv.outputs.keys()].sort(compareBytes);
  outNames.forEach((name, i) => {
    const o = drv.outputs.get(name)!;
    if (i > 0) parts.push(',');
    parts.push(`(${quoteRaw(name)},${quoteRaw(mask ? '' : o.path)},${quoteRaw(o.methodAlgo)},${quoteRaw(o.hash)})`);
  });
  parts.push('],[');
  const inputDrvs = opts.inputDrvs ?? (drv as Partial<Derivation>).inputDrvs ?? new Map<string, string[]>();
  const keys = [...inputDrvs.keys()].sort(compareBytes);
  keys.forEach((k, i) => {
    if (i > 0) parts.push(',');
    parts.push(`(${quoteRaw(k)},[${sortedUnique(inputDrvs.get(k)!).map(quoteRaw).join(',')}])`);
  });
  parts.push('],[');
  parts.push(sortedUnique(drv.inputSrcs).map(quoteRaw).join(','));
  parts.push('],');
  parts.push(quoteRaw(drv.platform), ',', quote(drv.builder), ',[');
  parts.push(drv.args.map(quote).join(','));
  parts.push('],[');
  const envKeys = [...drv.env.keys()].sort(compareBytes);
  envKeys.forEach((k, i) => {
    if (i > 0) parts.push(',');
    const v = mask && drv.outputs.has(k) ? '' : drv.env.get(k)!;
    parts.push(`(${quote(k)},${quote(v)})`);
  });
  parts.push('])');
  return parts.join('');
}

// ---------------------------------------------------------------------------------------------------------------
// Names and paths

/** The derivation name from a `.drv` path: base name minus hash part, dash and `.drv`. */
export function drvNameFromPath(drvPath: string, storeDir: string = DEFAULT_STORE_DIR): string {
  const sp = StorePath.parse(drvPath, storeDir);
  if (!sp.isDerivation || sp.name.length <= 4) {
    throw new DerivationError(`'${drvPath}' is not a derivation path (its name must end in .drv)`);
  }
  return sp.name.slice(0, -4);
}

/** The `.drv` store path: a text path of the ATerm, with references = inputSrcs ∪ input `.drv` paths (§5.5). */
export function derivationPath(drv: Derivation | BasicDerivation, storeDir: string = DEFAULT_STORE_DIR): string {
  const text = printDerivation(drv);
  const inputDrvs = (drv as Partial<Derivation>).inputDrvs ?? new Map<string, string[]>();
  return makeTextPath(
    `${drv.name}.drv`,
    sha256(Buffer.from(text, 'latin1')),
    [...drv.inputSrcs, ...inputDrvs.keys()],
    storeDir,
  );
}

/** `builtins.placeholder`: `/` + nix32(sha256("nix-output:<output>")) (§5.6). */
export function hashPlaceholder(outputName: string): string {
  return `/${nix32(sha256(`nix-output:${outputName}`).digest)}`;
}

/** The placeholder a dependent derivation uses for an output of a floating content-addressed input derivation. */
export function unknownCaOutputPlaceholder(drvPath: string, outputName: string, storeDir = DEFAULT_STORE_DIR): string {
  const sp = StorePath.parse(drvPath, storeDir);
  const drvName = drvNameFromPath(drvPath, storeDir);
  return `/${nix32(sha256(`nix-upstream-output:${sp.hashPart}:${outputPathName(drvName, outputName)}`).digest)}`;
}

/** The file name (in the build directory) of a `passAsFile` attribute: `.attr-<nix32(sha256(name))>` (§5.6). */
export function passAsFileName(attrName: string): string {
  return `.attr-${nix32(sha256(Buffer.from(attrName, 'latin1')).digest)}`;
}

// ---------------------------------------------------------------------------------------------------------------
// Wire form (§6.2)

/** Bounds for the fields of a BasicDerivation read from the wire (the reader's limits bound args and env). */
export const WIRE_MAX = {
  outputs: 4096,
  outputName: 256,
  path: 4096,
  methodAlgo: 64,
  hash: 1024,
  platform: 1024,
  builder: 64 * 1024,
  envKey: 64 * 1024,
  /** The whole BasicDerivation (default; `readBasicDerivation` takes `maxBytes`). */
  total: 64 * 1024 * 1024,
} as const;

/**
 * Read a BasicDerivation (serve cmd 8 / worker op 36). `name` comes from the `.drv` path (`drvNameFromPath`).
 * Strings are kept as latin1; every length and count is bounded before it is read.
 */
export async function readBasicDerivation(
  r: WireReader,
  name: string,
  opts: ParseOptions & { maxBytes?: number } = {},
): Promise<BasicDerivation> {
  const storeDir = opts.storeDir ?? DEFAULT_STORE_DIR;
  const start = r.offset;
  const maxBytes = opts.maxBytes ?? WIRE_MAX.total;
  const str = async (what: string, max: number) => {
    const left = maxBytes - (r.offset - start) - 8;
    if (left < 0) throw new DerivationError(`derivation '${name}' is larger than ${maxBytes} bytes`, r.offset);
    return (await r.readBytes(what, Math.min(max, left))).toString('latin1');
  };
  const nOutputs = await r.readCount('derivation outputs', WIRE_MAX.outputs);
  const outputs = new Map<string, DerivationOutput>();
  for (let i = 0; i < nOutputs; i++) {
    const at = r.offset;
    const outName = await str('output name', WIRE_MAX.outputName);
    const path = await str('output path', WIRE_MAX.path);
    const methodAlgo = await str('output hash algorithm', WIRE_MAX.methodAlgo);
    const hash = await str('output hash', WIRE_MAX.hash);
    if (outputs.has(outName)) throw new DerivationError(`derivation '${name}': duplicate output '${outName}'`, at);
    outputs.set(outName, { path, methodAlgo, hash });
  }
  const nSrcs = await r.readCount('derivation input sources');
  const inputSrcs: string[] = [];
  const seen = new Set<string>();
  for (let i = 0; i < nSrcs; i++) {
    const p = await str('input source', WIRE_MAX.path);
    if (!seen.has(p)) inputSrcs.push(p);
    seen.add(p);
  }
  const platform = await str('platform', WIRE_MAX.platform);
  const builder = await str('builder', WIRE_MAX.builder);
  const nArgs = await r.readCount('builder arguments');
  const args: string[] = [];
  for (let i = 0; i < nArgs; i++) args.push(await str('builder argument', r.limits.maxString));
  const nEnv = await r.readCount('environment');
  const env = new Map<string, string>();
  for (let i = 0; i < nEnv; i++) {
    const at = r.offset;
    const k = await str('environment variable name', WIRE_MAX.envKey);
    const v = await str(`value of environment variable`, r.limits.maxString);
    if (env.has(k)) throw new DerivationError(`derivation '${name}': duplicate environment variable '${k}'`, at);
    env.set(k, v);
  }
  const drv: BasicDerivation = { name, outputs, inputSrcs, platform, builder, args, env };
  validateDerivation(drv, storeDir);
  return drv;
}

/** Write a BasicDerivation in wire form (outputs, inputSrcs and env sorted as Nix sends them). */
export function writeBasicDerivation(w: WireWriter, drv: BasicDerivation): void {
  const b = (s: string) => Buffer.from(s, 'latin1');
  const outNames = [...drv.outputs.keys()].sort(compareBytes);
  w.u64(outNames.length);
  for (const name of outNames) {
    const o = drv.outputs.get(name)!;
    w.string(b(name)).string(b(o.path)).string(b(o.methodAlgo)).string(b(o.hash));
  }
  w.strings(sortedUnique(drv.inputSrcs).map(b));
  w.string(b(drv.platform));
  w.string(b(drv.builder));
  w.strings(drv.args.map(b));
  const keys = [...drv.env.keys()].sort(compareBytes);
  w.u64(keys.length);
  for (const k of keys) w.string(b(k)).string(b(drv.env.get(k)!));
}

// ---------------------------------------------------------------------------------------------------------------
// Hash modulo and output paths (§5.5)

/** Loads an input derivation by `.drv` path (from the store), or undefined if it is not available. */
export type LoadDerivation = (drvPath: string) => Derivation | undefined;

/**
 * Result of hash modulo: per-output hashes, and whether the derivation is "deferred" (it or an input is floating
 * content-addressed, deferred or impure), in which case its output paths cannot be known before inputs are built.
 */
export interface DrvHash {
  hashes: Map<string, Hash>;
  deferred: boolean;
}

/** Memo of unmasked hash-modulo results by `.drv` path; reuse one across calls to share work. */
export type DrvHashCache = Map<string, DrvHash>;

export interface HashModuloOptions {
  storeDir?: string;
  cache?: DrvHashCache;
}

const IMPURE_OUTPUT_HASH = sha256('impure');

/**
 * Nix's `hashDerivationModulo`: per output name, the hash that input-addressed output paths and DrvOutput ids are
 * made from. Fixed-output derivations hash to `sha256("fixed:out:<methodAlgo>:<base16>:<path>")`; otherwise the
 * ATerm is hashed with (if `mask`) output paths blanked and with each input `.drv` replaced by the base16
 * (unmasked, memoised) hash modulo of the outputs used. A BasicDerivation hashes with an empty input list.
 */
export function hashDerivationModulo(
  drv: BasicDerivation | Derivation,
  mask: boolean,
  loadInputDrv: LoadDerivation,
  opts: HashModuloOptions = {},
): Map<string, Hash> {
  return drvHash(drv, mask, loadInputDrv, opts).hashes;
}

/** `hashDerivationModulo` with the deferred flag. */
export function drvHash(
  drv: BasicDerivation | Derivation,
  mask: boolean,
  loadInputDrv: LoadDerivation,
  opts: HashModuloOptions = {},
): DrvHash {
  return hashModulo(drv, mask, loadInputDrv, opts.storeDir ?? DEFAULT_STORE_DIR, opts.cache ?? new Map(), []);
}

function hashModulo(
  drv: BasicDerivation | Derivation,
  mask: boolean,
  load: LoadDerivation,
  storeDir: string,
  cache: DrvHashCache,
  stack: string[],
): DrvHash {
  const kind = derivationKind(drv);
  const hashes = new Map<string, Hash>();
  if (kind === 'fixed') {
    const ca = fixedOutputCa(drv)!;
    const path = makeFixedOutputPath(outputPathName(drv.name, 'out'), ca, [], false, storeDir);
    const methodAlgo = renderMethodAlgo(ca.method, ca.hash.algo);
    hashes.set('out', sha256(`fixed:out:${methodAlgo}:${ca.hash.toBase16()}:${path}`));
    return { hashes, deferred: false };
  }
  if (kind === 'impure') {
    for (const name of drv.outputs.keys()) hashes.set(name, IMPURE_OUTPUT_HASH);
    return { hashes, deferred: true };
  }
  let deferred = kind !== 'inputAddressed';
  const inputs = new Map<string, Set<string>>();
  const inputDrvs = (drv as Partial<Derivation>).inputDrvs;
  if (inputDrvs) {
    for (const [drvPath, outputNames] of inputDrvs) {
      let res = cache.get(drvPath);
      if (!res) {
        if (stack.includes(drvPath)) {
          throw new DerivationError(`cycle in input derivations: ${[...stack, drvPath].join(' -> ')}`);
        }
        const input = load(drvPath);
        if (!input) {
          throw new DerivationError(`input derivation '${drvPath}' of derivation '${drv.name}' is not available`);
        }
        res = hashModulo(input, false, load, storeDir, cache, [...stack, drvPath]);
        cache.set(drvPath, res);
      }
      if (res.deferred) deferred = true;
      for (const o of outputNames) {
        const h = res.hashes.get(o);
        if (!h)
          throw new DerivationError(`no hash for output '${o}' of input derivation '${drvPath}' of '${drv.name}'`);
        const key = h.toBase16();
        const set = inputs.get(key);
        if (set) set.add(o);
        else inputs.set(key, new Set([o]));
      }
    }
  }
  const text = printDerivation(drv, { maskOutputs: mask, inputDrvs: inputs });
  const h = sha256(Buffer.from(text, 'latin1'));
  for (const name of drv.outputs.keys()) hashes.set(name, h);
  return { hashes, deferred };
}

/**
 * The output paths of an input-addressed or fixed-output derivation, by output name (what Nix writes into the
 * ATerm and env). Floating, deferred and impure outputs have no path before the build: that is an error here.
 */
export function computeOutputPaths(
  drv: BasicDerivation | Derivation,
  loadInputDrv: LoadDerivation,
  storeDir: string = DEFAULT_STORE_DIR,
  cache?: DrvHashCache,
): Map<string, string> {
  const kind = derivationKind(drv);
  const out = new Map<string, string>();
  if (kind === 'fixed') {
    out.set('out', makeFixedOutputPath(outputPathName(drv.name, 'out'), fixedOutputCa(drv)!, [], false, storeDir));
    return out;
  }
  const unknown = () =>
    new DerivationError(`derivation '${drv.name}' has ${kind} outputs, whose paths are only known after the build`);
  if (kind !== 'inputAddressed') throw unknown();
  const res = drvHash(drv, true, loadInputDrv, { storeDir, cache });
  if (res.deferred) {
    throw new DerivationError(
      `derivation '${drv.name}' depends on content-addressed derivations; its output paths are not known yet`,
    );
  }
  for (const [name, h] of res.hashes) out.set(name, makeOutputPath(name, h, drv.name, storeDir));
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// DrvOutput ids and realisations (§1.3)

/** `sha256:<hex>!<outputName>` */
export function drvOutputId(hashModulo: Hash, outputName: string): string {
  return `${hashModulo.algo}:${hashModulo.toBase16()}!${outputName}`;
}

export function parseDrvOutputId(id: string): { hash: Hash; outputName: string } {
  const bang = id.lastIndexOf('!');
  if (bang < 0) throw new DerivationError(`invalid derivation output id '${id}': no '!'`);
  const outputName = id.slice(bang + 1);
  const e = nameError(outputName);
  if (e !== undefined) throw new DerivationError(`invalid derivation output id '${id}': output name: ${e}`);
  try {
    return { hash: Hash.parseAnyPrefixed(id.slice(0, bang)), outputName };
  } catch (err) {
    throw new DerivationError(`invalid derivation output id '${id}': ${(err as Error).message}`);
  }
}

export interface Realisation {
  id: string;
  /** Full store path or base name; serialised as the base name. */
  outPath: string;
  signatures?: string[];
  dependentRealisations?: Record<string, string>;
}

/** Compact JSON with sorted keys, as nlohmann writes it: `{"dependentRealisations":{},"id":…,"outPath":…,"signatures":[]}`. */
export function realisationJson(r: Realisation): string {
  const slash = r.outPath.lastIndexOf('/');
  const outPath = slash >= 0 ? r.outPath.slice(slash + 1) : r.outPath;
  StorePath.fromBaseName(outPath);
  const deps: Record<string, string> = {};
  for (const k of Object.keys(r.dependentRealisations ?? {}).sort(compareBytes)) {
    deps[k] = r.dependentRealisations![k]!;
  }
  return JSON.stringify({
    dependentRealisations: deps,
    id: r.id,
    outPath,
    signatures: [...(r.signatures ?? [])].sort(compareBytes),
  });
}

export function parseRealisation(json: string): Realisation {
  let v: unknown;
  try {
    v = JSON.parse(json);
  } catch (e) {
    throw new DerivationError(`invalid realisation JSON: ${(e as Error).message}`);
  }
  const o = v as Record<string, unknown>;
  if (typeof o !== 'object' || o === null || typeof o.id !== 'string' || typeof o.outPath !== 'string') {
    throw new DerivationError('invalid realisation JSON: "id" and "outPath" strings are required');
  }
  parseDrvOutputId(o.id);
  StorePath.fromBaseName(o.outPath);
  const r: Realisation = { id: o.id, outPath: o.outPath };
  if (Array.isArray(o.signatures)) r.signatures = o.signatures.filter((s): s is string => typeof s === 'string');
  if (o.dependentRealisations && typeof o.dependentRealisations === 'object') {
    r.dependentRealisations = o.dependentRealisations as Record<string, string>;
  }
  return r;
}

/**
 * The `builtOutputs` of a BuildResult for a BasicDerivation received by a server: DrvOutput id (from the masked
 * hash modulo of the BasicDerivation as received, §5.5 step 4) → realisation JSON with the given output paths.
 */
export function builtOutputs(
  drv: BasicDerivation,
  outputPaths: Map<string, string>,
  storeDir: string = DEFAULT_STORE_DIR,
): Map<string, string> {
  const { name, outputs, inputSrcs, platform, builder, args, env } = drv;
  const basic: BasicDerivation = { name, outputs, inputSrcs, platform, builder, args, env };
  const hashes = hashDerivationModulo(basic, true, () => undefined, { storeDir });
  const out = new Map<string, string>();
  for (const [name, h] of hashes) {
    const path = outputPaths.get(name);
    if (path === undefined) continue;
    const id = drvOutputId(h, name);
    out.set(id, realisationJson({ id, outPath: path }));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Fixed-output checks (§6.8 step 6)

export function hashMismatchMessage(drvPath: string, specified: Hash, got: Hash): string {
  return (
    `hash mismatch in fixed-output derivation '${drvPath}':\n` +
    `  specified: ${specified.toSRI()}\n` +
    `     got:    ${got.toSRI()}`
  );
}

/** undefined if `actual` is the declared hash, else Nix's mismatch message. */
export function checkFixedOutputHash(drvPath: string, expected: ContentAddress, actual: Hash): string | undefined {
  return expected.hash.equals(actual) ? undefined : hashMismatchMessage(drvPath, expected.hash, actual);
}

// ---------------------------------------------------------------------------------------------------------------
// Derivation attributes (env, or structured attrs in `__json`)

/**
 * Attributes of a derivation as the builder sees them: from the env, or, with structured attrs, from the JSON in
 * `__json` (decoded as UTF-8). Mirrors Nix's ParsedDerivation.
 */
export class DerivationAttrs {
  /** The structured attrs object, if the derivation uses `__structuredAttrs`. */
  readonly structured: Record<string, unknown> | undefined;

  constructor(readonly drv: BasicDerivation) {
    const json = drv.env.get('__json');
    if (json !== undefined) {
      let v: unknown;
      try {
        v = JSON.parse(Buffer.from(json, 'latin1').toString('utf8'));
      } catch (e) {
        throw new DerivationError(`cannot process __json attribute of '${drv.name}': ${(e as Error).message}`);
      }
      if (typeof v !== 'object' || v === null || Array.isArray(v)) {
        throw new DerivationError(`__json attribute of '${drv.name}' is not a JSON object`);
      }
      this.structured = v as Record<string, unknown>;
    }
  }

  /** A string attribute (latin1 for env values, JS string for structured attrs). */
  getString(name: string): string | undefined {
    if (this.structured) {
      const v = this.structured[name];
      if (v === undefined) return undefined;
      if (typeof v !== 'string') {
        throw new DerivationError(`attribute '${name}' of derivation '${this.drv.name}' must be a string`);
      }
      return v;
    }
    return this.drv.env.get(name);
  }

  getBool(name: string, def = false): boolean {
    if (this.structured) {
      const v = this.structured[name];
      if (v === undefined) return def;
      if (typeof v !== 'boolean') {
        throw new DerivationError(`attribute '${name}' of derivation '${this.drv.name}' must be a Boolean`);
      }
      return v;
    }
    const v = this.drv.env.get(name);
    return v === undefined ? def : v === '1';
  }

  /** A list attribute: a JSON list of strings, or an env value split on whitespace. */
  getStrings(name: string): string[] | undefined {
    if (this.structured) {
      const v = this.structured[name];
      if (v === undefined) return undefined;
      if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) {
        throw new DerivationError(`attribute '${name}' of derivation '${this.drv.name}' must be a list of strings`);
      }
      return v as string[];
    }
    const v = this.drv.env.get(name);
    return v === undefined ? undefined : tokenize(v);
  }

  /** Sorted, without duplicates; floating/deferred/impure derivations also require `ca-derivations` (as in Nix). */
  requiredSystemFeatures(): string[] {
    const set = new Set(this.getStrings('requiredSystemFeatures') ?? []);
    const kind = derivationKind(this.drv);
    if (kind === 'floating' || kind === 'deferred' || kind === 'impure') set.add('ca-derivations');
    return [...set].sort(compareBytes);
  }
}

function tokenize(s: string): string[] {
  return s.split(/[ \t\n\r]+/).filter((t) => t !== '');
}

/** The `requiredSystemFeatures` of a derivation (env var, space separated, or the structured attr). */
export function requiredSystemFeatures(drv: BasicDerivation): string[] {
  return new DerivationAttrs(drv).requiredSystemFeatures();
}
