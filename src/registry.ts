/**
 * The users registry: `users.nix` (the data subset of Nix, module `nix-data`) naming the users, and `keys/<name>`
 * files (authorized_keys lines, module `authorized-keys`) holding their public keys.
 *
 * `users.nix` takes the community box's two forms:
 *
 *     { alice = { trusted = true; sudo = true; keys = ./keys/alice; jobs = 4; vouchedBy = [ "bob" ]; }; … }
 *     [ { name = "alice"; trusted = true; keys = ./keys/alice; } … ]
 *
 * Fields it does not know are kept in `User.extra`, never rejected. `trusted` means "vouched-for community member"
 * and nothing more: it never grants Nix-level trust (../shared/design/trust-model.md).
 *
 * `RegistryWatcher` keeps the current good registry for the SSH server, reloads it when the files change (fs.watch
 * plus a stat poll, since fs.watch is unreliable), and keeps the last good registry when an edit is broken.
 */
import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { type FSWatcher, watch } from 'node:fs';
import { lstat, readdir, readFile, realpath, stat } from 'node:fs/promises';
import { dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import {
  type AuthorizedKey,
  type AuthorizedKeysResult,
  algoMatchesKeyType,
  parseAuthorizedKeys,
} from './authorized-keys.js';
import {
  type NixAttrs,
  type NixParseResult,
  type NixValue,
  type PlainValue,
  parseNixData,
  type Span,
  toPlain,
} from './nix-data.js';

export type Severity = 'error' | 'warning';

export type ProblemCode =
  | 'syntax'
  | 'structure'
  | 'field'
  | 'name'
  | 'duplicate-user'
  | 'no-keys'
  | 'key-file'
  | 'key-line'
  | 'weak-key'
  | 'private-key'
  | 'duplicate-key'
  | 'expired-key'
  | 'unreferenced-key-file'
  | 'order'
  | 'vouch';

export interface Problem {
  /** Absolute path of the file the problem is in. */
  file: string;
  line: number;
  col: number;
  severity: Severity;
  message: string;
  code: ProblemCode;
}

export interface User {
  name: string;
  /** Vouched-for community member. Never Nix trust. */
  trusted: boolean;
  /** Box administrator. */
  sudo: boolean;
  /** Per-user build limit, if set. */
  jobs?: number;
  vouchedBy: string[];
  /** Keys the built-in SSH server accepts. */
  keys: AuthorizedKey[];
  /** Keys parsed fine but only usable through an OpenSSH front door (sk-…, cert-authority, from=/command=). */
  unusableKeys: AuthorizedKey[];
  /** Absolute path of the key file. */
  keyFile?: string;
  /** Fields the registry does not interpret, as plain data (paths are `{ path }`). */
  extra: Record<string, PlainValue>;
  /** Where the entry is (users.nix, 1-based). */
  file: string;
  line: number;
  col: number;
}

export interface Registry {
  /** Directory of users.nix (real path). */
  dir: string;
  /** Absolute path of users.nix. */
  file: string;
  /** Users whose entries are valid. */
  users: Map<string, User>;
  problems: Problem[];
  /** sha256 over users.nix and the key files it references: equal digests mean equal registries. */
  digest: string;
  /** users.nix did not exist (and the caller allowed that). */
  missing: boolean;
  loadedAt: Date;
  /** Where it came from when not a plain directory, e.g. a git commit. */
  source?: string;
}

/** One user entry as written in users.nix, for tools that lint or edit the file. */
export interface RegistryEntry {
  name: string;
  /** Span of the name (the attribute name, or the `name = "…"` string in list form). */
  nameSpan: Span;
  /** Span of the whole entry: `alice = { … };` or the list element `{ … }`. */
  span: Span;
  /** Entry's attribute set, when it is one. */
  value: NixValue;
  /** Spans of the entry's fields. */
  fieldSpans: Map<string, Span>;
  /** `vouchedBy` names with their spans. */
  vouchedBy: Array<{ name: string; span: Span }>;
}

export interface RegistryAnalysis extends Registry {
  form: 'attrs' | 'list' | undefined;
  parse: NixParseResult | undefined;
  /** Entries in file order (attribute-set form: by first appearance of the name). */
  entries: RegistryEntry[];
  /** Every file under keys/ (absolute path) → the users referencing it (possibly none) and its parse. */
  keyFiles: Map<string, { users: string[]; result?: AuthorizedKeysResult }>;
}

export interface LoadOptions {
  /** users.nix, relative to the directory (or absolute). */
  usersFile?: string;
  /** A missing users.nix is an empty registry instead of an error. */
  allowMissing?: boolean;
  /** For expiry checks. */
  now?: Date;
}

/** The registry could not be read at all (missing directory or file, permissions): nothing to check. */
export class RegistryReadError extends Error {
  constructor(
    message: string,
    readonly path: string,
  ) {
    super(message);
    this.name = 'RegistryReadError';
  }
}

export const MAX_USERS_FILE_BYTES = 8 * 1024 * 1024;
export const MAX_KEY_FILE_BYTES = 256 * 1024;

/** Problem codes that are lint only: they never stop the box from using a registry. */
const LINT_ONLY: ReadonlySet<ProblemCode> = new Set(['unreferenced-key-file', 'order', 'vouch']);

/**
 * A unix login name as shadow-utils accepts it (relaxed mode, which NixOS uses): 1–32 characters from
 * `A–Z a–z 0–9 . _ -`, not starting with `-`, not `.` or `..`, not all digits.
 */
export function userNameProblem(name: string): string | undefined {
  const shown = JSON.stringify(name);
  if (name.length === 0) return 'the user name is empty';
  if (name.length > 32) return `invalid user name ${shown}: longer than 32 characters`;
  if (!/^[A-Za-z0-9._-]+$/.test(name)) {
    return `invalid user name ${shown}: a unix login name uses only A-Z a-z 0-9 . _ -`;
  }
  if (name.startsWith('-')) return `invalid user name ${shown}: it must not start with '-'`;
  if (name === '.' || name === '..') return `invalid user name ${shown}`;
  if (/^[0-9]+$/.test(name)) return `invalid user name ${shown}: it must not be all digits (that reads as a uid)`;
  return undefined;
}

export function isValidUserName(name: string): boolean {
  return userNameProblem(name) === undefined;
}

/** Path of `file` for messages: relative to `base` when inside it. */
export function displayPath(file: string, base = process.cwd()): string {
  const rel = relative(base, file);
  return rel && !rel.startsWith('..') && !isAbsolute(rel) ? rel : file;
}

/** `file:line:col: message` (warnings say so). */
export function formatProblem(p: Problem, base?: string): string {
  return `${displayPath(p.file, base)}:${p.line}:${p.col}: ${p.severity === 'warning' ? 'warning: ' : ''}${p.message}`;
}

export function sortProblems(problems: Problem[]): Problem[] {
  return problems.sort((a, b) => (a.file === b.file ? a.line - b.line || a.col - b.col : a.file < b.file ? -1 : 1));
}

function isInside(child: string, parent: string): boolean {
  return child === parent || child.startsWith(parent.endsWith(sep) ? parent : parent + sep);
}

function errCode(e: unknown): string | undefined {
  return (e as NodeJS.ErrnoException)?.code;
}

/**
 * Read and interpret a registry directory, reporting every problem found (lint-level ones included). Throws
 * `RegistryReadError` only when there is nothing to read.
 */
export async function analyzeRegistry(dirArg: string, opts: LoadOptions = {}): Promise<RegistryAnalysis> {
  const now = opts.now ?? new Date();
  let dir: string;
  try {
    dir = await realpath(dirArg);
    if (!(await stat(dir)).isDirectory()) throw new RegistryReadError(`${dirArg} is not a directory`, dirArg);
  } catch (e) {
    if (e instanceof RegistryReadError) throw e;
    throw new RegistryReadError(`cannot read registry directory ${dirArg}: ${errCode(e) ?? String(e)}`, dirArg);
  }
  const file = resolve(dir, opts.usersFile ?? 'users.nix');
  const problems: Problem[] = [];
  const users = new Map<string, User>();
  const entries: RegistryEntry[] = [];
  const keyFiles: RegistryAnalysis['keyFiles'] = new Map();
  const base: RegistryAnalysis = {
    dir,
    file,
    users,
    problems,
    digest: '',
    missing: false,
    loadedAt: now,
    form: undefined,
    parse: undefined,
    entries,
    keyFiles,
  };
  const hash = createHash('sha256');

  let bytes: Buffer;
  try {
    const real = await realpath(file);
    if (!isInside(real, dir)) throw new RegistryReadError(`${file} points outside the registry directory`, file);
    const st = await stat(real);
    if (!st.isFile()) throw new RegistryReadError(`${file} is not a regular file`, file);
    if (st.size > MAX_USERS_FILE_BYTES) throw new RegistryReadError(`${file} is larger than 8 MiB`, file);
    bytes = await readFile(real);
  } catch (e) {
    if (e instanceof RegistryReadError) throw e;
    if (errCode(e) === 'ENOENT' && opts.allowMissing) {
      base.missing = true;
      base.digest = 'missing';
      return base;
    }
    throw new RegistryReadError(`cannot read ${file}: ${errCode(e) ?? String(e)}`, file);
  }
  hash.update(`users\0${bytes.length}\0`).update(bytes);

  const add = (f: string, span: { line: number; col: number }, severity: Severity, code: ProblemCode, msg: string) =>
    problems.push({ file: f, line: span.line, col: span.col, severity, code, message: msg });

  const parse = parseNixData(bytes, file);
  base.parse = parse;
  for (const e of parse.errors) add(file, e, 'error', 'syntax', e.reason);

  // Gather entries.
  const top = parse.errors.length === 0 ? parse.value : undefined;
  if (top) {
    if (top.kind === 'attrs') {
      base.form = 'attrs';
      const seen = new Set<string>();
      const whole = new Map<string, Span>();
      for (const e of top.entries) {
        const name = e.path[0]!.name;
        if (e.path.length === 1) {
          // Nix merges `alice = { … }; alice = { … };` when the fields differ; in a registry it is a mistake.
          const prev = whole.get(name);
          if (prev) {
            const msg = `user ${JSON.stringify(name)} is already defined at ${prev.line}:${prev.col}`;
            add(file, e.path[0]!.span, 'error', 'duplicate-user', msg);
          } else whole.set(name, e.path[0]!.span);
        }
        if (seen.has(name)) continue;
        seen.add(name);
        const f = top.fields.get(name)!;
        entries.push(makeEntry(name, f.nameSpan, e.path.length === 1 ? e.span : f.value.span, f.value));
      }
    } else if (top.kind === 'list') {
      base.form = 'list';
      for (const item of top.items) {
        if (item.kind !== 'attrs') {
          add(
            file,
            item.span,
            'error',
            'structure',
            'each element of the list must be a user: { name = "…"; keys = ./keys/…; }',
          );
          continue;
        }
        const nameField = item.fields.get('name');
        if (!nameField) {
          add(file, item.span, 'error', 'structure', 'this user has no `name = "…";`');
          continue;
        }
        if (nameField.value.kind !== 'string') {
          add(file, nameField.value.span, 'error', 'field', '`name` must be a string');
          continue;
        }
        entries.push(makeEntry(nameField.value.value, nameField.value.span, item.span, item));
      }
    } else {
      add(
        file,
        top.span,
        'error',
        'structure',
        'users.nix must be an attribute set of users ({ alice = { … }; }) or a list of users ([ { name = "alice"; … } ])',
      );
    }
  }

  // Interpret each entry.
  const byKeyFile = new Map<string, string>();
  const referenced = new Set<string>();
  const byBlob = new Map<string, { user: string; file: string; line: number }>();
  const keyDir = join(dirname(file), 'keys');
  const firstEntryOf = new Map<string, RegistryEntry>();
  for (const entry of entries) {
    const prev = firstEntryOf.get(entry.name);
    if (prev) {
      add(
        file,
        entry.nameSpan,
        'error',
        'duplicate-user',
        `user ${JSON.stringify(entry.name)} is already defined at ${prev.nameSpan.line}:${prev.nameSpan.col}`,
      );
      continue;
    }
    firstEntryOf.set(entry.name, entry);
    const user = await interpretEntry(entry);
    if (user) users.set(user.name, user);
  }

  async function interpretEntry(entry: RegistryEntry): Promise<User | undefined> {
    const shown = JSON.stringify(entry.name);
    let ok = true;
    const nameErr = userNameProblem(entry.name);
    if (nameErr) {
      add(file, entry.nameSpan, 'error', 'name', nameErr);
      ok = false;
    }
    const v = entry.value;
    if (v.kind !== 'attrs') {
      add(
        file,
        v.span,
        'error',
        'structure',
        `user ${shown} must be an attribute set: { keys = ./keys/${entry.name}; … }`,
      );
      return undefined;
    }
    const user: User = {
      name: entry.name,
      trusted: false,
      sudo: false,
      vouchedBy: [],
      keys: [],
      unusableKeys: [],
      extra: {},
      file,
      line: entry.nameSpan.line,
      col: entry.nameSpan.col,
    };
    let keysPath: { value: string; span: Span } | undefined;
    for (const [fname, field] of v.fields) {
      const fv = field.value;
      switch (fname) {
        case 'name':
          if (base.form === 'list') break;
          user.extra.name = toPlain(fv);
          break;
        case 'trusted':
        case 'sudo':
          if (fv.kind !== 'bool') {
            add(file, fv.span, 'error', 'field', `\`${fname}\` must be true or false`);
            ok = false;
          } else user[fname] = fv.value;
          break;
        case 'jobs':
          if (fv.kind !== 'int' || fv.value < 1) {
            add(file, fv.span, 'error', 'field', '`jobs` must be a positive integer');
            ok = false;
          } else user.jobs = fv.value;
          break;
        case 'vouchedBy':
          if (fv.kind !== 'list' || fv.items.some((x) => x.kind !== 'string')) {
            add(file, fv.span, 'error', 'field', '`vouchedBy` must be a list of user names: [ "bob" ]');
            ok = false;
          } else user.vouchedBy = fv.items.map((x) => (x.kind === 'string' ? x.value : ''));
          break;
        case 'keys':
          if (fv.kind !== 'path') {
            add(file, fv.span, 'error', 'field', `\`keys\` must be a path such as ./keys/${entry.name}`);
            ok = false;
          } else keysPath = { value: fv.value, span: fv.span };
          break;
        default:
          user.extra[fname] = toPlain(fv);
      }
    }
    if (!keysPath) {
      if (!v.fields.has('keys')) {
        add(
          file,
          entry.nameSpan,
          'error',
          'no-keys',
          `user ${shown} has no key file (add keys = ./keys/${entry.name};)`,
        );
      }
      return undefined;
    }
    // The key file is read (and linted) even for an invalid entry: it is referenced, and its problems are real.
    const loaded = await loadKeyFile(user, keysPath);
    return loaded && ok ? user : undefined;
  }

  async function loadKeyFile(user: User, keysPath: { value: string; span: Span }): Promise<boolean> {
    const shown = JSON.stringify(user.name);
    if (isAbsolute(keysPath.value)) {
      add(
        file,
        keysPath.span,
        'error',
        'key-file',
        `\`keys\` must be a relative path inside the registry (./keys/${user.name})`,
      );
      return false;
    }
    const abs = resolve(dirname(file), keysPath.value);
    referenced.add(abs);
    const rel = displayPath(abs, dir);
    let real: string;
    try {
      real = await realpath(abs);
    } catch (e) {
      const msg =
        errCode(e) === 'ENOENT'
          ? `key file ${rel} of user ${shown} does not exist`
          : `cannot read key file ${rel}: ${errCode(e) ?? String(e)}`;
      add(file, keysPath.span, 'error', 'no-keys', msg);
      return false;
    }
    if (!isInside(real, dir)) {
      add(file, keysPath.span, 'error', 'key-file', `key file ${rel} points outside the registry directory`);
      return false;
    }
    const other = byKeyFile.get(real);
    if (other !== undefined) {
      add(
        file,
        keysPath.span,
        'error',
        'duplicate-key',
        `key file ${rel} is already used by user ${JSON.stringify(other)}`,
      );
      return false;
    }
    byKeyFile.set(real, user.name);
    let content: Buffer;
    try {
      const st = await stat(real);
      if (!st.isFile()) {
        add(file, keysPath.span, 'error', 'key-file', `key file ${rel} is not a regular file`);
        return false;
      }
      if (st.size > MAX_KEY_FILE_BYTES) {
        add(file, keysPath.span, 'error', 'key-file', `key file ${rel} is larger than 256 KiB`);
        return false;
      }
      content = await readFile(real);
    } catch (e) {
      add(file, keysPath.span, 'error', 'key-file', `cannot read key file ${rel}: ${errCode(e) ?? String(e)}`);
      return false;
    }
    hash.update(`key\0${rel}\0${content.length}\0`).update(content);
    user.keyFile = abs;
    const result = parseAuthorizedKeys(content, now);
    const kf = keyFiles.get(abs) ?? { users: [] };
    kf.users.push(user.name);
    kf.result = result;
    keyFiles.set(abs, kf);
    reportKeyProblems(abs, result);
    for (const k of result.keys) {
      const id = k.blob.toString('base64');
      const owner = byBlob.get(id);
      if (owner && owner.user !== user.name) {
        add(
          abs,
          k,
          'error',
          'duplicate-key',
          `this key (${k.fingerprint}) is already used by user ${JSON.stringify(owner.user)} (${displayPath(owner.file, dir)}:${owner.line}); a key belongs to one user`,
        );
        continue;
      }
      byBlob.set(id, { user: user.name, file: abs, line: k.line });
      if (k.usable) user.keys.push(k);
      else user.unusableKeys.push(k);
    }
    if (result.keys.length === 0 && result.problems.length === 0) {
      add(abs, { line: 1, col: 1 }, 'error', 'no-keys', `key file of user ${shown} has no keys`);
    }
    return true;
  }

  function reportKeyProblems(abs: string, result: AuthorizedKeysResult): void {
    for (const p of result.problems) {
      const code: ProblemCode =
        p.kind === 'private-key'
          ? 'private-key'
          : p.kind === 'weak'
            ? 'weak-key'
            : p.kind === 'expired'
              ? 'expired-key'
              : p.kind === 'duplicate'
                ? 'duplicate-key'
                : 'key-line';
      add(abs, p, p.severity, code, p.message);
    }
  }

  // Every file under keys/: unreferenced ones are reported, and scanned for private keys all the same.
  let names: string[] = [];
  try {
    names = (await readdir(keyDir)).sort();
  } catch {
    // no keys/ directory
  }
  // When users.nix does not parse, nobody can be said to use a file: lint every key file on its own instead.
  const unparsed = top === undefined;
  for (const n of names) {
    if (n.startsWith('.')) continue;
    const abs = join(keyDir, n);
    if (keyFiles.has(abs) || referenced.has(abs)) continue;
    let st: Awaited<ReturnType<typeof lstat>>;
    try {
      st = await lstat(abs);
    } catch {
      continue;
    }
    if (!st.isFile()) continue;
    const entry: { users: string[]; result?: AuthorizedKeysResult } = { users: [] };
    keyFiles.set(abs, entry);
    if (!unparsed) {
      add(
        abs,
        { line: 1, col: 1 },
        'error',
        'unreferenced-key-file',
        `key file ${displayPath(abs, dir)} is not used by any user in ${displayPath(file, dir)}`,
      );
    }
    if (st.size <= MAX_KEY_FILE_BYTES) {
      try {
        entry.result = parseAuthorizedKeys(await readFile(abs), now);
        if (unparsed) reportKeyProblems(abs, entry.result);
        else {
          for (const p of entry.result.problems) {
            if (p.kind === 'private-key') add(abs, p, 'error', 'private-key', p.message);
          }
        }
      } catch {
        // unreadable
      }
    }
  }

  base.digest = hash.digest('hex');
  sortProblems(problems);
  return base;

  function makeEntry(name: string, nameSpan: Span, span: Span, value: NixValue): RegistryEntry {
    const fieldSpans = new Map<string, Span>();
    const vouchedBy: RegistryEntry['vouchedBy'] = [];
    if (value.kind === 'attrs') {
      for (const [k, f] of (value as NixAttrs).fields) {
        fieldSpans.set(k, f.value.span);
        if (k === 'vouchedBy' && f.value.kind === 'list') {
          for (const it of f.value.items) if (it.kind === 'string') vouchedBy.push({ name: it.value, span: it.span });
        }
      }
    }
    return { name, nameSpan, span, value, fieldSpans, vouchedBy };
  }
}

/** Load a registry the way the box uses it: lint-only problems (order, vouching, unused key files) left out. */
export async function loadRegistry(dir: string, opts: LoadOptions = {}): Promise<Registry> {
  const a = await analyzeRegistry(dir, opts);
  return {
    dir: a.dir,
    file: a.file,
    users: a.users,
    problems: a.problems.filter((p) => !LINT_ONLY.has(p.code)),
    digest: a.digest,
    missing: a.missing,
    loadedAt: a.loadedAt,
  };
}

export function emptyRegistry(dir: string, file = join(dir, 'users.nix')): Registry {
  return { dir, file, users: new Map(), problems: [], digest: 'empty', missing: true, loadedAt: new Date() };
}

export function hasErrors(problems: readonly Problem[]): boolean {
  return problems.some((p) => p.severity === 'error');
}

/**
 * The key `userName` may log in with, given the algorithm and public key blob an SSH client offers
 * (ssh2's `ctx.key.algo` / `ctx.key.data`). Expired keys (expiry-time) are refused.
 */
export function findUserKey(
  registry: Registry,
  userName: string,
  keyAlgo: string,
  keyBlob: Buffer,
  now = new Date(),
): { user: User; key: AuthorizedKey } | undefined {
  const user = registry.users.get(userName);
  if (!user) return undefined;
  for (const key of user.keys) {
    if (!key.blob.equals(keyBlob)) continue;
    if (!algoMatchesKeyType(keyAlgo, key.type)) continue;
    if (key.expiresAt && key.expiresAt.getTime() <= now.getTime()) continue;
    return { user, key };
  }
  return undefined;
}

/** What the SSH server needs from wherever the registry comes from (a directory or git). */
export interface RegistryProvider {
  readonly registry: Registry;
  authorize(userName: string, keyAlgo: string, keyBlob: Buffer): User | undefined;
  findKey(userName: string, keyAlgo: string, keyBlob: Buffer): { user: User; key: AuthorizedKey } | undefined;
  close(): void | Promise<void>;
}

/** Minimal structured logger (pino-compatible). */
export interface RegistryLogger {
  info(obj: object, msg?: string): void;
  warn(obj: object, msg?: string): void;
  error(obj: object, msg?: string): void;
}

export interface RegistryWatcherOptions {
  dir: string;
  usersFile?: string;
  /** A missing users.nix is an empty registry (default true). */
  allowMissing?: boolean;
  /** Quiet time after a file event before reloading (default 150 ms). */
  debounceMs?: number;
  /** Stat-poll interval, the fallback for lost fs.watch events (default 2000 ms; 0 disables). */
  pollMs?: number;
  /** Use fs.watch for quick reaction (default true); the poll works alone without it. */
  watch?: boolean;
  logger?: RegistryLogger;
}

export type ReloadOutcome = 'applied' | 'unchanged' | 'rejected';

export interface RegistryError {
  at: Date;
  /** One-line summary. */
  message: string;
  problems: Problem[];
}

/**
 * Holds the current good registry of a directory and follows its changes.
 *
 * Events: `change` (registry, previous) when a new registry is applied; `rejected` (RegistryError) when an edit is
 * broken and the last good registry stays; `problems` (Problem[]) after every load that found any. It never emits
 * `error`, so a missing listener cannot crash the process.
 *
 * Policy: a registry with any error-severity problem is not applied while a good one is held. At the first load
 * there is nothing better, so the valid part is used (users with broken entries left out) and the errors reported.
 */
export class RegistryWatcher extends EventEmitter implements RegistryProvider {
  private current: Registry;
  private hasGood = false;
  lastError: RegistryError | undefined;
  private readonly debounceMs: number;
  private readonly pollMs: number;
  private watchers = new Map<string, FSWatcher>();
  private debounce: NodeJS.Timeout | undefined;
  private poller: NodeJS.Timeout | undefined;
  private signature = '';
  private running: Promise<ReloadOutcome> | undefined;
  private again = false;
  private closed = false;

  constructor(private readonly opts: RegistryWatcherOptions) {
    super();
    this.debounceMs = opts.debounceMs ?? 150;
    this.pollMs = opts.pollMs ?? 2000;
    this.current = emptyRegistry(resolve(opts.dir), resolve(opts.dir, opts.usersFile ?? 'users.nix'));
  }

  /** Load the registry (see the class comment for errors) and start watching. */
  static async start(opts: RegistryWatcherOptions): Promise<RegistryWatcher> {
    const w = new RegistryWatcher(opts);
    await w.start();
    return w;
  }

  async start(): Promise<Registry> {
    await this.reload();
    this.arm();
    this.signature = await this.computeSignature();
    if (this.pollMs > 0) {
      this.poller = setInterval(() => void this.poll(), this.pollMs);
      this.poller.unref();
    }
    return this.current;
  }

  get registry(): Registry {
    return this.current;
  }

  authorize(userName: string, keyAlgo: string, keyBlob: Buffer): User | undefined {
    return findUserKey(this.current, userName, keyAlgo, keyBlob)?.user;
  }

  findKey(userName: string, keyAlgo: string, keyBlob: Buffer): { user: User; key: AuthorizedKey } | undefined {
    return findUserKey(this.current, userName, keyAlgo, keyBlob);
  }

  /** Reload now. Concurrent calls are coalesced; the result is that of the last load. */
  reload(): Promise<ReloadOutcome> {
    if (this.running) {
      this.again = true;
      return this.running;
    }
    this.running = (async () => {
      let outcome: ReloadOutcome;
      do {
        this.again = false;
        outcome = await this.loadOnce();
      } while (this.again && !this.closed);
      this.running = undefined;
      return outcome;
    })();
    return this.running;
  }

  private async loadOnce(): Promise<ReloadOutcome> {
    const log = this.opts.logger;
    let next: Registry;
    try {
      next = await loadRegistry(this.opts.dir, {
        usersFile: this.opts.usersFile,
        allowMissing: this.opts.allowMissing ?? true,
      });
    } catch (e) {
      const message = e instanceof Error ? e.message : String(e);
      return this.reject({ at: new Date(), message, problems: [] });
    }
    if (next.problems.length) this.emit('problems', next.problems);
    if (this.hasGood && next.digest === this.current.digest) {
      if (!hasErrors(next.problems)) this.lastError = undefined;
      return 'unchanged';
    }
    const errors = next.problems.filter((p) => p.severity === 'error');
    if (errors.length && this.hasGood) {
      return this.reject({
        at: new Date(),
        message: `registry ${next.file} has ${errors.length} error(s); keeping the previous registry`,
        problems: next.problems,
      });
    }
    for (const p of next.problems) {
      (p.severity === 'error' ? log?.error : log?.warn)?.call(log, { problem: formatProblem(p) }, 'registry problem');
    }
    const previous = this.current;
    this.current = next;
    this.hasGood = true;
    this.lastError = errors.length
      ? { at: new Date(), message: `registry ${next.file} has ${errors.length} error(s)`, problems: next.problems }
      : undefined;
    log?.info({ users: next.users.size, file: next.file }, 'registry loaded');
    this.emit('change', next, previous);
    return 'applied';
  }

  private reject(err: RegistryError): ReloadOutcome {
    this.lastError = err;
    const log = this.opts.logger;
    log?.error({ problems: err.problems.map((p) => formatProblem(p)) }, err.message);
    this.emit('rejected', err);
    return 'rejected';
  }

  /** fs.watch the directory and keys/ (re-armed on every poll, since directories come and go). */
  private arm(): void {
    if (this.closed || this.opts.watch === false) return;
    const dir = resolve(this.opts.dir);
    const usersDir = dirname(resolve(dir, this.opts.usersFile ?? 'users.nix'));
    for (const d of new Set([dir, usersDir, join(usersDir, 'keys')])) {
      if (this.watchers.has(d)) continue;
      try {
        const w = watch(d, { persistent: false }, () => this.schedule());
        w.on('error', () => {
          w.close();
          this.watchers.delete(d);
          this.schedule();
        });
        this.watchers.set(d, w);
      } catch {
        // not there (yet): the poll covers it
      }
    }
  }

  private schedule(): void {
    if (this.closed) return;
    if (this.debounce) clearTimeout(this.debounce);
    this.debounce = setTimeout(() => {
      this.debounce = undefined;
      void this.computeSignature().then((sig) => {
        this.signature = sig;
        return this.reload();
      });
    }, this.debounceMs);
    this.debounce.unref();
  }

  private async poll(): Promise<void> {
    if (this.closed) return;
    this.arm();
    const sig = await this.computeSignature();
    if (sig !== this.signature) {
      this.signature = sig;
      await this.reload();
    }
  }

  /** Cheap fingerprint of the files that make the registry: stat of users.nix, keys/ and every key file. */
  private async computeSignature(): Promise<string> {
    const file = resolve(this.opts.dir, this.opts.usersFile ?? 'users.nix');
    const paths = new Set([file]);
    const keyDir = join(dirname(file), 'keys');
    try {
      for (const n of await readdir(keyDir)) paths.add(join(keyDir, n));
    } catch {
      // none
    }
    for (const u of this.current.users.values()) if (u.keyFile) paths.add(u.keyFile);
    const parts: string[] = [];
    for (const p of [...paths].sort()) {
      try {
        const st = await stat(p, { bigint: true });
        parts.push(`${p}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`);
      } catch {
        parts.push(`${p}:-`);
      }
    }
    return parts.join('\n');
  }

  close(): void {
    this.closed = true;
    if (this.debounce) clearTimeout(this.debounce);
    if (this.poller) clearInterval(this.poller);
    for (const w of this.watchers.values()) w.close();
    this.watchers.clear();
    this.removeAllListeners();
  }
}
