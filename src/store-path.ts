/**
 * Store paths (spec §5): validation, the fingerprint and 160-bit compression that make hash parts, the path types
 * (`text`, `source`, `output:<id>`), and content-address strings (§1.3).
 */
import { Hash, type HashAlgo, type HashError, parseHashAlgo, sha256 } from './hash.js';
import * as nix32 from './nix32.js';

export const DEFAULT_STORE_DIR = '/nix/store';
export const HASH_PART_LENGTH = 32;
export const MAX_NAME_LENGTH = 211;

export class StorePathError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'StorePathError';
  }
}

const NAME_CHAR = (() => {
  const t = new Uint8Array(128);
  for (const c of '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-._?=') t[c.charCodeAt(0)] = 1;
  return t;
})();

/** Why `name` is not a valid store path name, or undefined if it is. */
export function nameError(name: string): string | undefined {
  if (name.length === 0) return 'name is empty';
  if (name.length > MAX_NAME_LENGTH) return `name is longer than ${MAX_NAME_LENGTH} characters (${name.length})`;
  for (let i = 0; i < name.length; i++) {
    const c = name.charCodeAt(i);
    if (c >= 128 || NAME_CHAR[c] !== 1) {
      return `name contains the forbidden character ${JSON.stringify(name[i])} at position ${i}`;
    }
  }
  if (name === '.' || name === '..') return `name may not be '${name}'`;
  if (name.startsWith('.-') || name.startsWith('..-'))
    return `name may not start with '${name.startsWith('.-') ? '.-' : '..-'}'`;
  return undefined;
}

export function isValidName(name: string): boolean {
  return nameError(name) === undefined;
}

/** Why `hashPart` is not a valid store path hash part, or undefined if it is. */
export function hashPartError(hashPart: string): string | undefined {
  if (hashPart.length !== HASH_PART_LENGTH) {
    return `hash part must be ${HASH_PART_LENGTH} characters, got ${hashPart.length}`;
  }
  for (let i = 0; i < hashPart.length; i++) {
    const c = hashPart.charCodeAt(i);
    if (c > 255 || nix32.IS_NIX32_BYTE[c] !== 1) {
      return `hash part contains the non-nix32 character ${JSON.stringify(hashPart[i])} at position ${i}`;
    }
  }
  return undefined;
}

export function isValidHashPart(hashPart: string): boolean {
  return hashPartError(hashPart) === undefined;
}

function checkStoreDir(storeDir: string): void {
  if (!storeDir.startsWith('/') || (storeDir.length > 1 && storeDir.endsWith('/'))) {
    throw new StorePathError(`store directory '${storeDir}' must be absolute and have no trailing slash`);
  }
}

/** A validated store path: `<storeDir>/<hashPart>-<name>` without the store directory. */
export class StorePath {
  private constructor(
    readonly hashPart: string,
    readonly name: string,
  ) {}

  /** Validate a base name `<hashPart>-<name>`. */
  static fromBaseName(base: string): StorePath {
    const fail = (why: string) => new StorePathError(`'${base}' is not a valid store path base name: ${why}`);
    if (base.length < HASH_PART_LENGTH + 2 || base[HASH_PART_LENGTH] !== '-') {
      throw fail(`expected ${HASH_PART_LENGTH} nix32 characters, a dash and a name`);
    }
    const hashPart = base.slice(0, HASH_PART_LENGTH);
    const name = base.slice(HASH_PART_LENGTH + 1);
    const err = hashPartError(hashPart) ?? nameError(name);
    if (err !== undefined) throw fail(err);
    return new StorePath(hashPart, name);
  }

  /** Make a store path from its parts, validating both. */
  static fromParts(hashPart: string, name: string): StorePath {
    const err = hashPartError(hashPart) ?? nameError(name);
    if (err !== undefined) throw new StorePathError(`invalid store path '${hashPart}-${name}': ${err}`);
    return new StorePath(hashPart, name);
  }

  /** Parse a full store path `<storeDir>/<hash>-<name>`; anything else (subpaths included) is an error. */
  static parse(fullPath: string, storeDir: string = DEFAULT_STORE_DIR): StorePath {
    checkStoreDir(storeDir);
    const prefix = storeDir === '/' ? '/' : `${storeDir}/`;
    if (!fullPath.startsWith(prefix)) {
      throw new StorePathError(`path '${fullPath}' is not in the Nix store ${storeDir}`);
    }
    const base = fullPath.slice(prefix.length);
    if (base.includes('/')) {
      throw new StorePathError(`path '${fullPath}' is not a store path (it is inside one, or has a trailing slash)`);
    }
    try {
      return StorePath.fromBaseName(base);
    } catch (e) {
      throw new StorePathError(`'${fullPath}' is not a valid store path: ${stripWhy(e as Error, base)}`);
    }
  }

  /**
   * Split a path inside the store (e.g. `/nix/store/<hash>-busybox/bin/sh`) into the store path and the rest
   * (`/bin/sh`, or '' for the store path itself).
   */
  static parseWithin(path: string, storeDir: string = DEFAULT_STORE_DIR): { storePath: StorePath; subPath: string } {
    checkStoreDir(storeDir);
    const prefix = storeDir === '/' ? '/' : `${storeDir}/`;
    if (!path.startsWith(prefix)) throw new StorePathError(`path '${path}' is not in the Nix store ${storeDir}`);
    const rest = path.slice(prefix.length);
    const slash = rest.indexOf('/');
    const base = slash < 0 ? rest : rest.slice(0, slash);
    return { storePath: StorePath.parse(prefix + base, storeDir), subPath: slash < 0 ? '' : rest.slice(slash) };
  }

  /** True if `fullPath` is a valid store path in `storeDir`. */
  static isStorePath(fullPath: string, storeDir: string = DEFAULT_STORE_DIR): boolean {
    try {
      StorePath.parse(fullPath, storeDir);
      return true;
    } catch {
      return false;
    }
  }

  get baseName(): string {
    return `${this.hashPart}-${this.name}`;
  }

  get isDerivation(): boolean {
    return this.name.endsWith('.drv');
  }

  toString(storeDir: string = DEFAULT_STORE_DIR): string {
    return storeDir === '/' ? `/${this.baseName}` : `${storeDir}/${this.baseName}`;
  }

  equals(other: StorePath): boolean {
    return this.hashPart === other.hashPart && this.name === other.name;
  }
}

function stripWhy(e: Error, base: string): string {
  const p = `'${base}' is not a valid store path base name: `;
  return e.message.startsWith(p) ? e.message.slice(p.length) : e.message;
}

/** XOR-fold a digest into `size` bytes (Nix's `compressHash`). */
export function compressHash(digest: Uint8Array, size: number): Buffer {
  const out = Buffer.alloc(size);
  for (let i = 0; i < digest.length; i++) out[i % size] = out[i % size]! ^ digest[i]!;
  return out;
}

/**
 * The store path for `<type>:<algo>:<innerHash hex>:<storeDir>:<name>` (§5.3). `type` is e.g. `source`,
 * `text:/nix/store/…`, `output:out`. Returns the full path string.
 */
export function makeStorePath(
  type: string,
  innerHash: Hash,
  name: string,
  storeDir: string = DEFAULT_STORE_DIR,
): string {
  checkStoreDir(storeDir);
  const err = nameError(name);
  if (err !== undefined) throw new StorePathError(`cannot make a store path named '${name}': ${err}`);
  const fingerprint = `${type}:${innerHash.algo}:${innerHash.toBase16()}:${storeDir}:${name}`;
  const hashPart = nix32.encode(compressHash(sha256(fingerprint).digest, 20));
  return StorePath.fromParts(hashPart, name).toString(storeDir);
}

/** `<type>` followed by `:<ref>` for each sorted reference and `:self` if requested. */
function makeType(type: string, references: Iterable<string>, hasSelfReference: boolean, storeDir: string): string {
  const refs = [...new Set(references)];
  for (const r of refs) StorePath.parse(r, storeDir);
  refs.sort(compareBytes);
  let out = type;
  for (const r of refs) out += `:${r}`;
  if (hasSelfReference) out += ':self';
  return out;
}

/** Bytewise comparison for ASCII/latin1 strings (C++ std::string order). */
export function compareBytes(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** A text-hashed path (`builtins.toFile`, `.drv` files): `contentHash` = sha256 of the file's bytes. */
export function makeTextPath(
  name: string,
  contentHash: Hash,
  references: Iterable<string> = [],
  storeDir: string = DEFAULT_STORE_DIR,
): string {
  if (contentHash.algo !== 'sha256') {
    throw new StorePathError(`text-hashed path '${name}' must use sha256, not ${contentHash.algo}`);
  }
  return makeStorePath(makeType('text', references, false, storeDir), contentHash, name, storeDir);
}

/** How the contents of a content-addressed path are hashed. */
export type ContentAddressMethod = 'flat' | 'recursive' | 'text' | 'git';

/** A content address: method and hash. */
export interface ContentAddress {
  method: ContentAddressMethod;
  hash: Hash;
}

/** The ingestion prefix used in fingerprints and `methodAlgo` strings: '', 'r:', 'text:' or 'git:'. */
export function methodPrefix(method: ContentAddressMethod): string {
  switch (method) {
    case 'flat':
      return '';
    case 'recursive':
      return 'r:';
    case 'text':
      return 'text:';
    case 'git':
      return 'git:';
    default:
      throw new StorePathError(`unknown content-address method '${String(method)}'`);
  }
}

/**
 * The path of a content-addressed object (§5.4): `source` for recursive sha256, a text path for `text`, and
 * `output:out` (no references allowed) for everything else.
 */
export function makeFixedOutputPath(
  name: string,
  ca: ContentAddress,
  references: Iterable<string> = [],
  hasSelfReference = false,
  storeDir: string = DEFAULT_STORE_DIR,
): string {
  const { method, hash } = ca;
  if (method === 'text') {
    if (hasSelfReference) throw new StorePathError(`text-hashed path '${name}' cannot refer to itself`);
    return makeTextPath(name, hash, references, storeDir);
  }
  if (method === 'git' && hash.algo !== 'sha1') {
    throw new StorePathError(`git-hashed path '${name}' must use sha1, not ${hash.algo}`);
  }
  if (method === 'recursive' && hash.algo === 'sha256') {
    return makeStorePath(makeType('source', references, hasSelfReference, storeDir), hash, name, storeDir);
  }
  const refs = [...references];
  if (refs.length > 0 || hasSelfReference) {
    throw new StorePathError(
      `fixed-output path '${name}' (${renderContentAddressMethod(method, hash.algo)}) may not refer to other store paths`,
    );
  }
  const inner = sha256(`fixed:out:${methodPrefix(method)}${hash.algo}:${hash.toBase16()}:`);
  return makeStorePath('output:out', inner, name, storeDir);
}

/** Name of a derivation output's path: `<drvName>` for `out`, `<drvName>-<output>` otherwise. */
export function outputPathName(drvName: string, outputName: string): string {
  return outputName === 'out' ? drvName : `${drvName}-${outputName}`;
}

/** The path of an input-addressed derivation output (§5.5 step 3). */
export function makeOutputPath(
  outputName: string,
  hashModulo: Hash,
  drvName: string,
  storeDir: string = DEFAULT_STORE_DIR,
): string {
  return makeStorePath(`output:${outputName}`, hashModulo, outputPathName(drvName, outputName), storeDir);
}

export class ContentAddressError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ContentAddressError';
  }
}

/** `text:sha256`, `fixed:sha256`, `fixed:r:sha1`, `fixed:git:sha1`, … */
export function renderContentAddressMethod(method: ContentAddressMethod, algo: HashAlgo): string {
  return method === 'text' ? `text:${algo}` : `fixed:${methodPrefix(method)}${algo}`;
}

/** Parse a content-address method string (worker `AddToStore`), e.g. `fixed:r:sha256` or `text:sha256`. */
export function parseContentAddressMethod(s: string): { method: ContentAddressMethod; algo: HashAlgo } {
  const r = parseMethodAndRest(s, false);
  if (r.rest !== undefined) throw new ContentAddressError(`invalid content-address method '${s}'`);
  return { method: r.method, algo: r.algo };
}

/** `text:sha256:<nix32>` or `fixed:[r:|git:]<algo>:<nix32>`. */
export function renderContentAddress(ca: ContentAddress): string {
  return `${renderContentAddressMethod(ca.method, ca.hash.algo)}:${ca.hash.toNix32()}`;
}

/** Parse a `ca` string (§1.3). The hash may be in any unprefixed encoding (Nix writes nix32). */
export function parseContentAddress(s: string): ContentAddress {
  const r = parseMethodAndRest(s, true);
  if (r.rest === undefined) throw new ContentAddressError(`content address '${s}' has no hash`);
  try {
    return { method: r.method, hash: Hash.parse(r.rest, r.algo) };
  } catch (e) {
    throw new ContentAddressError(`invalid content address '${s}': ${(e as Error).message}`);
  }
}

/** Parse `ca`, returning undefined for the empty string (not content-addressed). */
export function parseOptionalContentAddress(s: string): ContentAddress | undefined {
  return s === '' ? undefined : parseContentAddress(s);
}

function parseMethodAndRest(
  s: string,
  withHash: boolean,
): { method: ContentAddressMethod; algo: HashAlgo; rest: string | undefined } {
  const what = withHash ? 'content address' : 'content-address method';
  const parts = s.split(':');
  let i = 0;
  let method: ContentAddressMethod;
  const kind = parts[i++];
  if (kind === 'text') method = 'text';
  else if (kind === 'fixed') {
    method = 'flat';
    if (parts[i] === 'r') {
      method = 'recursive';
      i++;
    } else if (parts[i] === 'git') {
      method = 'git';
      i++;
    }
  } else {
    throw new ContentAddressError(`${what} '${s}' must start with 'text:' or 'fixed:'`);
  }
  const algoName = parts[i++];
  if (algoName === undefined) throw new ContentAddressError(`${what} '${s}' names no hash algorithm`);
  let algo: HashAlgo;
  try {
    algo = parseHashAlgo(algoName);
  } catch (e) {
    throw new ContentAddressError(`invalid ${what} '${s}': ${(e as HashError).message}`);
  }
  if (method === 'text' && algo !== 'sha256') {
    throw new ContentAddressError(`${what} '${s}': text hashing requires sha256`);
  }
  const rest = i < parts.length ? parts.slice(i).join(':') : undefined;
  return { method, algo, rest };
}

/** Parse a derivation output's `methodAlgo` field (`sha256`, `r:sha256`, `text:sha256`, `git:sha1`). */
export function parseMethodAlgo(s: string): { method: ContentAddressMethod; algo: HashAlgo } {
  let method: ContentAddressMethod = 'flat';
  let rest = s;
  if (s.startsWith('r:')) {
    method = 'recursive';
    rest = s.slice(2);
  } else if (s.startsWith('text:')) {
    method = 'text';
    rest = s.slice(5);
  } else if (s.startsWith('git:')) {
    method = 'git';
    rest = s.slice(4);
  }
  let algo: HashAlgo;
  try {
    algo = parseHashAlgo(rest);
  } catch (e) {
    throw new ContentAddressError(`invalid output hash method/algorithm '${s}': ${(e as Error).message}`);
  }
  return { method, algo };
}

export function renderMethodAlgo(method: ContentAddressMethod, algo: HashAlgo): string {
  return `${methodPrefix(method)}${algo}`;
}
