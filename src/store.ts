/**
 * The box's store: path infos in SQLite, contents on disk deduplicated by NAR hash, per-user views (see
 * ../shared/design/trust-model.md).
 *
 * Model
 * - A store object is a (store path, NAR hash) pair. Rows of the `paths` table are keyed by (path, scope) where scope
 *   is `public` or one user; the same path may have a public row and private rows of several users, with different
 *   contents. Identical contents are stored once on disk: the `objects` table has one row per NAR hash, used by any
 *   number of path rows.
 * - A user's view: for each path, their private row if there is one, else the public row. Every query answers from
 *   the caller's view; a path outside it does not exist for them.
 * - An upload is public only when proven: a valid signature by a key in `trustedPublicKeys` (checked here, never
 *   taken on faith; only valid signatures are stored), or — with `shareContentAddressed` — a content address that
 *   matches its contents. Everything else lands in the uploader's scope. A public row also needs all its references
 *   to be public; otherwise it stays private.
 * - Builds register their outputs with `registerOutputs` in a scope chosen by the builder; public outputs are signed
 *   with the box's key when one is configured.
 *
 * On disk, under `<stateDir>/store/`:
 * - `db.sqlite` (WAL with `persist`; without it, the rollback journal in memory and no fsync): tables
 *   `objects(hash, nar_size, created)`, `inline_nars(hash, nar)`, `paths(id, path, scope, hash_part, nar_hash,
 *   nar_size, deriver, registration_time, ultimate, sigs, ca, last_used)`, `refs(referrer, reference)`; scope is
 *   `public` or `u:<user>` in the database.
 * - `objects/<nix32 NAR sha256>`: the extracted top-level node of each object (file, directory or symlink), read-only
 *   with canonical metadata. Small objects (NAR ≤ 64 KiB: `.drv` files, sources, scripts — most paths of a closure)
 *   are kept as their NAR in the `inline_nars` table instead, and extracted here only when a build needs them on
 *   disk (`realPath`): an upload of many small paths then costs no file creation per path, and their NARs are
 *   served straight from the database.
 * - `tmp/`: imports in progress, build output directories (`buildTmpDir()`), trees being deleted. Emptied at open.
 * Unless `persist` is set, `store/` is wiped at open (zero persistence, like the community box at every boot).
 *
 * API (user = registry name; all queries are in that user's view):
 *   Store.open(opts) / close()
 *   queryPathInfo(user, path) / isValidPath / queryValidPaths / queryClosure(user, paths, includeOutputs)
 *   queryPathFromHashPart(user, hashPart) / realPath(user, path) (async: extracts an inline object first)
 *   readRegularFile(user, path, maxBytes) / queryReferrers / queryDerivationOutputs / stats()
 *   addToStoreNar(user, info, nar, { batch, holder, signal }) — atomic, checked import of one NAR
 *   narFromPath(user, path) — streams the NAR from disk (or the database)
 *   registerOutputs(user, [{ info, fsPath }], scope) — build outputs, moved in from `buildTmpDir()`
 *   addTempRoot(holder, path) / releaseTempRoots(holder) / dropUser(user) / gc({ retentionSeconds, maxBytes, knownUsers })
 *
 * Concurrency: one process, async interleaving. Everything that touches the database or moves an object into or out of
 * `objects/` happens synchronously in one transaction, so no import, registration or GC sees another half done.
 */
import {
  chmodSync,
  cpSync,
  createReadStream,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
} from 'node:fs';
import { chmod, lstat, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import type { Logger } from 'pino';
import { drvNameFromPath, parseDerivation } from './derivation.js';
import { Hash, HashSink, hashBytes, hashStream } from './hash.js';
import { dumpPath, lexists, narRegularFile, parseNar, randomHex, restoreNar } from './nar.js';
import * as nix32 from './nix32.js';
import { type KeyRing, makeKeyRing, type SecretKey, signPathInfo, validPathInfoSignatures } from './signing.js';
import {
  type ContentAddress,
  DEFAULT_STORE_DIR,
  makeFixedOutputPath,
  parseContentAddress,
  StorePath,
} from './store-path.js';
import { WireReader } from './wire.js';

/** `'public'` or a registry user name. */
export type Scope = 'public' | string;

export interface PathInfo {
  path: string;
  deriver: string | null;
  /** sha256 of the NAR. */
  narHash: Hash;
  narSize: number;
  /** Full store paths, sorted. */
  references: string[];
  /** Unix seconds. */
  registrationTime: number;
  /** Built by this box. */
  ultimate: boolean;
  sigs: string[];
  /** Content address (§1.3), null if not content-addressed. */
  ca: string | null;
  scope: Scope;
}

export interface NewPathInfo {
  path: string;
  deriver: string | null;
  narHash: Hash;
  narSize: number;
  references: string[];
  registrationTime?: number;
  ultimate?: boolean;
  sigs?: string[];
  ca: string | null;
}

export interface StoreOptions {
  stateDir: string;
  /** Keep the store across restarts; otherwise objects and database are wiped at open. */
  persist: boolean;
  storeDir?: string;
  /** `name:base64` public keys whose signatures make an upload public. */
  trustedPublicKeys: Iterable<string>;
  /** The box's key: public build outputs are signed with it. */
  signingKey?: SecretKey;
  /** Content-addressed uploads whose contents match their path become public (default off). */
  shareContentAddressed?: boolean;
  /** Users still in the registry; private rows of anyone else are dropped at the next GC. */
  knownUsers?: (user: string) => boolean;
  /** Largest NAR kept in the database instead of extracted at import (default `INLINE_MAX_NAR`; 0: none). */
  inlineMaxNar?: number;
  logger?: Logger;
}

export interface AddOptions {
  /** Paths uploaded in the same batch: references to them are accepted even if they are not valid (yet). */
  batch?: ReadonlySet<string>;
  /** Holder (session id) that gets temporary roots on the references and on the imported path. */
  holder?: string;
  signal?: AbortSignal;
}

export interface GcOptions {
  /** Rows used (registered, held, exported) within this many seconds are kept, with their closures. */
  retentionSeconds: number;
  /** Disk budget: if what is kept still exceeds it, the retention window shrinks (never below live holders). */
  maxBytes?: number;
  /** Users still in the registry (default: the callback given to `open`, else everyone). */
  knownUsers?: (user: string) => boolean;
  /** Clock, for tests (Unix seconds). */
  now?: number;
}

export interface GcResult {
  deletedPaths: number;
  deletedObjects: number;
  freedBytes: number;
  keptPaths: number;
  keptBytes: number;
}

export interface StoreStats {
  objects: number;
  /** Objects kept inline in the database (small NARs), out of `objects`. */
  inlineObjects: number;
  /** Sum of the NAR sizes of all objects. */
  bytes: number;
  paths: number;
  /** Number of path rows per scope ('public' or user name). */
  pathsByScope: Record<string, number>;
  tempRootHolders: number;
}

export class StoreError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'StoreError';
  }
}

/** The import failed because the NAR does not match what the client declared. */
export class HashMismatchError extends StoreError {
  constructor(message: string) {
    super(message);
    this.name = 'HashMismatchError';
  }
}

const SCHEMA_VERSION = 2;
/** Version 1 lacks only the `inline_nars` table, which `SCHEMA` creates. */
const UPGRADABLE_VERSIONS = [1];
/** Objects whose NAR is at most this size are kept in the database (`inline_nars`), not extracted at import. */
export const INLINE_MAX_NAR = 64 * 1024;
/** Group commit of a non-persistent store: at most this long, and this many units, per transaction. */
const GROUP_COMMIT_MS = 100;
const GROUP_COMMIT_UNITS = 1000;
/** Larger `.drv` objects are not parsed for their outputs. */
const MAX_DRV_NAR = 16 * 1024 * 1024;
const PUBLIC = 'public';

const SCHEMA = `
CREATE TABLE IF NOT EXISTS objects (
  hash TEXT PRIMARY KEY,             -- nix32 of the NAR sha256 = entry name under objects/
  nar_size INTEGER NOT NULL,
  created INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inline_nars (
  hash TEXT PRIMARY KEY REFERENCES objects(hash) ON DELETE CASCADE,
  nar BLOB NOT NULL                  -- the whole NAR (at most INLINE_MAX_NAR bytes)
);
CREATE TABLE IF NOT EXISTS paths (
  id INTEGER PRIMARY KEY,
  path TEXT NOT NULL,
  scope TEXT NOT NULL,               -- 'public' or 'u:<user>'
  hash_part TEXT NOT NULL,
  nar_hash TEXT NOT NULL REFERENCES objects(hash),
  nar_size INTEGER NOT NULL,
  deriver TEXT,
  registration_time INTEGER NOT NULL,
  ultimate INTEGER NOT NULL,
  sigs TEXT NOT NULL,                -- JSON array of verified signatures
  ca TEXT,
  last_used INTEGER NOT NULL,
  UNIQUE (path, scope)
);
CREATE INDEX IF NOT EXISTS paths_hash_part ON paths(hash_part);
CREATE INDEX IF NOT EXISTS paths_nar_hash ON paths(nar_hash);
CREATE INDEX IF NOT EXISTS paths_deriver ON paths(deriver) WHERE deriver IS NOT NULL;
CREATE TABLE IF NOT EXISTS refs (
  referrer INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
  reference TEXT NOT NULL,
  PRIMARY KEY (referrer, reference)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_reference ON refs(reference);
`;

interface Row {
  id: number;
  path: string;
  scope: string;
  hash_part: string;
  nar_hash: string;
  nar_size: number;
  deriver: string | null;
  registration_time: number;
  ultimate: number;
  sigs: string;
  ca: string | null;
  last_used: number;
}

function scopeOfKey(key: string): Scope {
  return key === PUBLIC ? PUBLIC : key.slice(2);
}

function userKey(user: string): string {
  if (typeof user !== 'string' || user === '' || user.includes('\0')) {
    throw new StoreError(`invalid user name ${JSON.stringify(user)}`);
  }
  return `u:${user}`;
}

async function* oneChunk(b: Buffer): AsyncGenerator<Buffer> {
  yield b;
}

function nowSeconds(): number {
  return Math.floor(Date.now() / 1000);
}

/** Make a read-only tree (canonical store modes) deletable: owner write on every directory. */
function makeWritableSync(p: string): void {
  let st: ReturnType<typeof lstatSync>;
  try {
    st = lstatSync(p);
  } catch {
    return;
  }
  if (!st.isDirectory()) return;
  chmodSync(p, 0o755);
  for (const e of readdirSync(p, { withFileTypes: true })) {
    if (e.isDirectory()) makeWritableSync(join(p, e.name));
  }
}

/** Remove a tree that may hold read-only (canonical store mode) directories. */
export function removeTreeSync(p: string): void {
  makeWritableSync(p);
  rmSync(p, { recursive: true, force: true });
}

async function makeWritable(p: string): Promise<void> {
  let st: Awaited<ReturnType<typeof lstat>>;
  try {
    st = await lstat(p);
  } catch {
    return;
  }
  if (!st.isDirectory()) return;
  await chmod(p, 0o755);
  for (const e of await readdir(p, { withFileTypes: true })) {
    if (e.isDirectory()) await makeWritable(join(p, e.name));
  }
}

async function removeTree(p: string): Promise<void> {
  await makeWritable(p);
  await rm(p, { recursive: true, force: true });
}

function errorMessage(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

export class Store {
  readonly storeDir: string;
  /** `<stateDir>/store` */
  readonly root: string;
  readonly objectsDir: string;
  /** Scratch space on the same file system as `objectsDir` (renames into the store are atomic). */
  readonly tmpDir: string;
  private readonly db: Database.Database;
  private readonly trusted: KeyRing;
  private readonly signingKey: SecretKey | undefined;
  private readonly shareCA: boolean;
  private readonly inlineMaxNar: number;
  private readonly knownUsers: ((user: string) => boolean) | undefined;
  private readonly logger: Logger | undefined;
  private readonly tempRoots = new Map<string, Set<string>>();
  private readonly droppedUsers = new Set<string>();
  private readonly drvOutputsCache = new Map<string, string[]>();
  private holderSeq = 0;
  private closed = false;
  /** Group commit (non-persistent store): units in the open transaction, and the timer that commits it. */
  private groupUnits = 0;
  private groupTimer: NodeJS.Timeout | undefined;
  /** Run `fn` in a transaction (one wrapper for all; `db.transaction` builds a new one at every call). */
  private readonly inTx: <T>(fn: () => T) => T;

  // Prepared statements.
  private readonly sViewRow: Database.Statement<[string, string], Row>;
  private readonly sInView: Database.Statement<[string, string], number>;
  private readonly sRow: Database.Statement<[string, string], Row>;
  /** The public row and the user's row of a path (at most one each). */
  private readonly sRowsOfPath: Database.Statement<[string, string], Row>;
  private readonly sRefs: Database.Statement<[number], { reference: string }>;
  private readonly sHashPart: Database.Statement<[string, string], { path: string }>;
  private readonly sByDeriver: Database.Statement<[string, string], { path: string }>;
  private readonly sReferrers: Database.Statement<[string, string], { id: number; path: string }>;
  private readonly sObject: Database.Statement<[string], { hash: string; nar_size: number }>;
  private readonly sInsertObject: Database.Statement<[string, number, number]>;
  private readonly sInsertNewObject: Database.Statement<[string, number, number]>;
  private readonly sInlineNar: Database.Statement<[string], Buffer>;
  private readonly sInsertInline: Database.Statement<[string, Buffer]>;
  /** Inline objects being extracted into objects/ (`realPath`), by hash. */
  private readonly materialising = new Map<string, Promise<void>>();
  private readonly sInsertRow: Database.Statement<
    [string, string, string, string, number, string | null, number, number, string, string | null, number]
  >;
  private readonly sInsertRef: Database.Statement<[number, string]>;
  private readonly sDeleteRow: Database.Statement<[number]>;
  private readonly sUpdateSigs: Database.Statement<[string, number]>;
  private readonly sTouch: Database.Statement<[number, string]>;

  private constructor(opts: StoreOptions) {
    this.storeDir = opts.storeDir ?? DEFAULT_STORE_DIR;
    StorePath.parse(`${this.storeDir}/00000000000000000000000000000000-x`, this.storeDir); // validates storeDir
    this.root = join(opts.stateDir, 'store');
    this.objectsDir = join(this.root, 'objects');
    this.tmpDir = join(this.root, 'tmp');
    this.trusted = makeKeyRing(opts.trustedPublicKeys);
    this.signingKey = opts.signingKey;
    this.shareCA = opts.shareContentAddressed ?? false;
    this.inlineMaxNar = Math.min(opts.inlineMaxNar ?? INLINE_MAX_NAR, INLINE_MAX_NAR);
    this.knownUsers = opts.knownUsers;
    this.logger = opts.logger;

    if (!opts.persist && existsSync(this.root)) removeTreeSync(this.root);
    mkdirSync(this.objectsDir, { recursive: true, mode: 0o755 });
    if (existsSync(this.tmpDir)) removeTreeSync(this.tmpDir);
    mkdirSync(this.tmpDir, { recursive: true, mode: 0o700 });

    const dbFile = join(this.root, 'db.sqlite');
    const db = new Database(dbFile);
    this.db = db;
    try {
      if (opts.persist) {
        db.pragma('journal_mode = WAL');
        db.pragma('synchronous = NORMAL');
      } else {
        // Wiped at every start, the database never has to survive a crash, and only this process opens it: the
        // rollback journal in memory, no fsync, the file lock held once. Transactions stay atomic (ROLLBACK works),
        // and a commit costs a third of what it costs in WAL mode (bench/store.ts: 2,000 small imports). Commits
        // are grouped, too (see `inTx`).
        db.pragma('journal_mode = MEMORY');
        db.pragma('synchronous = OFF');
        db.pragma('locking_mode = EXCLUSIVE');
      }
      db.pragma('foreign_keys = ON');
      db.pragma('busy_timeout = 5000');
      const version = db.pragma('user_version', { simple: true }) as number;
      if (version !== 0 && version !== SCHEMA_VERSION && !UPGRADABLE_VERSIONS.includes(version)) {
        throw new StoreError(
          `store database ${dbFile} has schema version ${version}, this buildbox uses ${SCHEMA_VERSION}; ` +
            'remove the store directory or run without persist',
        );
      }
      db.exec(SCHEMA);
      db.pragma(`user_version = ${SCHEMA_VERSION}`);
    } catch (e) {
      db.close();
      throw e;
    }

    const tx = db.transaction((fn: () => unknown) => fn());
    if (opts.persist) {
      this.inTx = <T>(fn: () => T): T => tx(fn) as T;
    } else {
      // Group commit: each unit of work is a savepoint inside one long transaction, committed every
      // GROUP_COMMIT_MS (or GROUP_COMMIT_UNITS units). Its changes are visible to the whole process at once (one
      // connection), a failed unit still rolls back alone, and the database writes its dirty pages once per group
      // instead of once per import: nothing outside this process reads the database, and it does not outlive it.
      let depth = 0;
      this.inTx = <T>(fn: () => T): T => {
        if (depth === 0) {
          if (this.groupUnits >= GROUP_COMMIT_UNITS) this.commitGroup();
          if (!db.inTransaction) {
            db.exec('BEGIN');
            this.groupTimer = setTimeout(() => this.commitGroup(), GROUP_COMMIT_MS);
            this.groupTimer.unref();
          }
          this.groupUnits++;
        }
        depth++;
        try {
          return tx(fn) as T;
        } finally {
          depth--;
        }
      };
    }

    const cols =
      'id, path, scope, hash_part, nar_hash, nar_size, deriver, registration_time, ultimate, sigs, ca, last_used';
    this.sViewRow = db.prepare(
      `SELECT ${cols} FROM paths WHERE path = ? AND (scope = 'public' OR scope = ?) ORDER BY scope = 'public' LIMIT 1`,
    );
    this.sInView = db
      .prepare<[string, string], number>(
        `SELECT 1 FROM paths WHERE path = ? AND (scope = 'public' OR scope = ?) LIMIT 1`,
      )
      .pluck();
    this.sRow = db.prepare(`SELECT ${cols} FROM paths WHERE path = ? AND scope = ?`);
    this.sRowsOfPath = db.prepare(`SELECT ${cols} FROM paths WHERE path = ? AND (scope = 'public' OR scope = ?)`);
    this.sRefs = db.prepare('SELECT reference FROM refs WHERE referrer = ? ORDER BY reference');
    this.sHashPart = db.prepare(
      `SELECT path FROM paths WHERE hash_part = ? AND (scope = 'public' OR scope = ?) ORDER BY path LIMIT 1`,
    );
    this.sByDeriver = db.prepare(
      `SELECT DISTINCT path FROM paths WHERE deriver = ? AND (scope = 'public' OR scope = ?) ORDER BY path`,
    );
    this.sReferrers = db.prepare(
      `SELECT p.id AS id, p.path AS path FROM refs r JOIN paths p ON p.id = r.referrer
       WHERE r.reference = ? AND (p.scope = 'public' OR p.scope = ?)`,
    );
    this.sObject = db.prepare('SELECT hash, nar_size FROM objects WHERE hash = ?');
    this.sInsertObject = db.prepare('INSERT INTO objects (hash, nar_size, created) VALUES (?, ?, ?)');
    this.sInsertNewObject = db.prepare('INSERT OR IGNORE INTO objects (hash, nar_size, created) VALUES (?, ?, ?)');
    this.sInlineNar = db.prepare<[string], Buffer>('SELECT nar FROM inline_nars WHERE hash = ?').pluck();
    this.sInsertInline = db.prepare('INSERT INTO inline_nars (hash, nar) VALUES (?, ?)');
    this.sInsertRow = db.prepare(
      `INSERT INTO paths (path, scope, hash_part, nar_hash, nar_size, deriver, registration_time, ultimate, sigs, ca,
       last_used) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
    );
    this.sInsertRef = db.prepare('INSERT OR IGNORE INTO refs (referrer, reference) VALUES (?, ?)');
    this.sDeleteRow = db.prepare('DELETE FROM paths WHERE id = ?');
    this.sUpdateSigs = db.prepare('UPDATE paths SET sigs = ? WHERE id = ?');
    this.sTouch = db.prepare('UPDATE paths SET last_used = max(last_used, ?) WHERE path = ?');

    if (opts.persist) this.reconcile();
  }

  static open(opts: StoreOptions): Store {
    return new Store(opts);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.commitGroup();
    this.db.close();
  }

  /**
   * Commit the open group of units (non-persistent store). Should the commit itself fail (disk full), the group is
   * rolled back: its paths vanish as if collected, and objects moved in for them are removed.
   */
  private commitGroup(): void {
    clearTimeout(this.groupTimer);
    this.groupTimer = undefined;
    this.groupUnits = 0;
    if (!this.db.inTransaction) return;
    try {
      this.db.exec('COMMIT');
    } catch (e) {
      this.logger?.error({ err: errorMessage(e) }, 'store database commit failed; dropping the paths it held');
      if (this.db.inTransaction) this.db.exec('ROLLBACK');
      this.removeStrayObjects();
      this.drvOutputsCache.clear();
    }
  }

  /**
   * After a restart with `persist`: drop object directories the database does not know (an interrupted import) and
   * rows whose object vanished (with everything that referred to them).
   */
  private reconcile(): void {
    const known = new Set(this.db.prepare('SELECT hash FROM objects').pluck().all() as string[]);
    for (const name of readdirSync(this.objectsDir)) {
      if (!known.has(name)) {
        this.logger?.warn({ object: name }, 'removing an object directory the store database does not know');
        removeTreeSync(join(this.objectsDir, name));
      }
    }
    const inline = new Set(this.db.prepare('SELECT hash FROM inline_nars').pluck().all() as string[]);
    const missing = [...known].filter((h) => !inline.has(h) && !existsSync(join(this.objectsDir, h)));
    if (missing.length === 0) return;
    this.logger?.warn({ objects: missing.length }, 'objects missing on disk; dropping their path infos');
    this.inTx(() => {
      const delRows = this.db.prepare('DELETE FROM paths WHERE nar_hash = ?');
      const delObj = this.db.prepare('DELETE FROM objects WHERE hash = ?');
      for (const h of missing) {
        delRows.run(h);
        delObj.run(h);
      }
      // Anything that now refers to a path missing from its view goes too, until the store is closed under references.
      const dangling = this.db.prepare(
        `DELETE FROM paths WHERE id IN (
           SELECT r.referrer FROM refs r JOIN paths p ON p.id = r.referrer
           WHERE r.reference != p.path AND NOT EXISTS (
             SELECT 1 FROM paths q WHERE q.path = r.reference AND (q.scope = 'public' OR q.scope = p.scope)))`,
      );
      for (let n = 1; n > 0; ) n = dangling.run().changes;
      this.db.exec('DELETE FROM objects WHERE NOT EXISTS (SELECT 1 FROM paths p WHERE p.nar_hash = objects.hash)');
    });
    this.removeStrayObjects();
  }

  /** Remove the entries of objects/ that the database does not know. */
  private removeStrayObjects(): void {
    for (const name of readdirSync(this.objectsDir)) {
      if (!this.sObject.get(name)) removeTreeSync(join(this.objectsDir, name));
    }
  }

  // -------------------------------------------------------------------------------------------------------------
  // Queries
  // -------------------------------------------------------------------------------------------------------------

  private isStorePath(path: string): boolean {
    return typeof path === 'string' && StorePath.isStorePath(path, this.storeDir);
  }

  private viewRow(user: string, path: string): Row | undefined {
    if (!this.isStorePath(path)) return undefined;
    return this.sViewRow.get(path, userKey(user));
  }

  private toInfo(row: Row): PathInfo {
    return {
      path: row.path,
      deriver: row.deriver,
      narHash: new Hash('sha256', nix32.decode(row.nar_hash, 32)),
      narSize: row.nar_size,
      references: this.sRefs.all(row.id).map((r) => r.reference),
      registrationTime: row.registration_time,
      ultimate: row.ultimate !== 0,
      sigs: JSON.parse(row.sigs) as string[],
      ca: row.ca,
      scope: scopeOfKey(row.scope),
    };
  }

  /** The path info of `path` in `user`'s view, or undefined if it is not valid for them. */
  queryPathInfo(user: string, path: string): PathInfo | undefined {
    const row = this.viewRow(user, path);
    return row ? this.toInfo(row) : undefined;
  }

  isValidPath(user: string, path: string): boolean {
    return this.viewRow(user, path) !== undefined;
  }

  /** The subset of `paths` valid in `user`'s view, in the given order, without duplicates. */
  queryValidPaths(user: string, paths: Iterable<string>): string[] {
    const out: string[] = [];
    const seen = new Set<string>();
    for (const p of paths) {
      if (seen.has(p)) continue;
      seen.add(p);
      if (this.isValidPath(user, p)) out.push(p);
    }
    return out;
  }

  /**
   * The reference closure of `paths` in `user`'s view (sorted), including the paths themselves. With
   * `includeOutputs`, each `.drv` in the closure also brings the closures of its registered outputs. Every starting
   * path must be valid; references that are not (yet) valid are skipped.
   */
  queryClosure(user: string, paths: Iterable<string>, includeOutputs = false): string[] {
    const uk = userKey(user);
    const done = new Set<string>();
    const todo: string[] = [];
    for (const p of paths) {
      if (!this.viewRow(user, p)) throw new StoreError(`path '${p}' is not valid`);
      todo.push(p);
    }
    while (todo.length > 0) {
      const p = todo.pop()!;
      if (done.has(p)) continue;
      const row = this.sViewRow.get(p, uk);
      if (!row) continue;
      done.add(p);
      for (const { reference } of this.sRefs.all(row.id)) if (!done.has(reference)) todo.push(reference);
      if (includeOutputs && p.endsWith('.drv')) {
        for (const o of this.queryDerivationOutputs(user, p)) if (!done.has(o)) todo.push(o);
      }
    }
    return [...done].sort();
  }

  /** The valid path (in the view) whose hash part is `hashPart`. */
  queryPathFromHashPart(user: string, hashPart: string): string | undefined {
    if (typeof hashPart !== 'string' || hashPart.length !== 32 || !nix32.isNix32(hashPart)) return undefined;
    return this.sHashPart.get(hashPart, userKey(user))?.path;
  }

  /**
   * On-disk location of the top-level node of `path`'s object in the view (read-only; for builds' bind mounts). An
   * inline object is extracted into objects/ first (once; concurrent callers wait for the same extraction).
   */
  async realPath(user: string, path: string): Promise<string | undefined> {
    const row = this.viewRow(user, path);
    if (!row) return undefined;
    const hash = row.nar_hash;
    const dest = join(this.objectsDir, hash);
    if (!this.materialising.has(hash)) {
      const nar = this.sInlineNar.get(hash);
      if (nar === undefined || lexists(dest)) return dest;
      const done = this.materialise(hash, nar).finally(() => this.materialising.delete(hash));
      this.materialising.set(hash, done);
    }
    await this.materialising.get(hash);
    return dest;
  }

  /** Extract an inline object's NAR into objects/ (through a scratch name; nothing half-made is ever visible). */
  private async materialise(hash: string, nar: Buffer): Promise<void> {
    const tmp = this.newTmpName('inline');
    try {
      await restoreNar(new WireReader(oneChunk(nar)), tmp, { direct: true, expectEnd: true });
    } catch (e) {
      await removeTree(tmp).catch(() => {});
      throw new StoreError(`cannot extract store object ${hash}: ${errorMessage(e)}`, { cause: e });
    }
    // In the same tick as the check: a GC may have deleted the object meanwhile (then it stays deleted).
    const dest = join(this.objectsDir, hash);
    if (this.sObject.get(hash) && !lexists(dest)) renameTree(tmp, dest);
    else await removeTree(tmp);
  }

  /**
   * The contents of `path` in the view if its object is a regular file of at most `maxBytes` (undefined: not valid
   * in the view). Reads an inline object without extracting it. Throws a StoreError for anything else.
   */
  readRegularFile(user: string, path: string, maxBytes: number): Buffer | undefined {
    const row = this.viewRow(user, path);
    return row ? this.objectFile(row.nar_hash, path, maxBytes) : undefined;
  }

  private objectFile(hash: string, path: string, maxBytes: number): Buffer {
    const nar = this.sInlineNar.get(hash);
    let size: number;
    let read: () => Buffer;
    if (nar !== undefined) {
      const f = narRegularFile(nar);
      if (f === undefined) throw new StoreError(`path '${path}' is not a regular file`);
      size = f.contents.length;
      read = () => Buffer.from(f.contents);
    } else {
      const file = join(this.objectsDir, hash);
      const st = lstatSync(file);
      if (!st.isFile()) throw new StoreError(`path '${path}' is not a regular file`);
      size = st.size;
      read = () => readFileSync(file);
    }
    if (size > maxBytes) throw new StoreError(`path '${path}' is too large (${size} bytes, at most ${maxBytes})`);
    return read();
  }

  /** Paths in the view whose (viewed) path info refers to `path`. */
  queryReferrers(user: string, path: string): string[] {
    const uk = userKey(user);
    const out = new Set<string>();
    for (const r of this.sReferrers.all(path, uk)) {
      if (this.sViewRow.get(r.path, uk)?.id === r.id) out.add(r.path);
    }
    return [...out].sort();
  }

  /**
   * Outputs of `drvPath` that are valid in the view (sorted): the output paths the `.drv` (as in the view) declares,
   * and registered paths whose deriver is `drvPath` — counting only deriver fields this user or the box wrote (their
   * own rows, or build outputs registered by the box), since a deriver is not covered by signatures and another user
   * could otherwise attach paths to someone's derivation.
   */
  queryDerivationOutputs(user: string, drvPath: string): string[] {
    const uk = userKey(user);
    const out = new Set<string>();
    const drvRow = this.viewRow(user, drvPath);
    if (drvRow && drvPath.endsWith('.drv')) {
      for (const p of this.declaredOutputs(drvRow)) if (this.sViewRow.get(p, uk)) out.add(p);
    }
    for (const { path } of this.sByDeriver.all(drvPath, uk)) {
      const row = this.sViewRow.get(path, uk);
      if (row?.deriver === drvPath && (row.scope === uk || row.ultimate !== 0)) out.add(path);
    }
    return [...out].sort();
  }

  /** Output paths named in a `.drv` object (cached by NAR hash); [] if it cannot be read as a derivation. */
  private declaredOutputs(row: Row): string[] {
    const cached = this.drvOutputsCache.get(row.nar_hash);
    if (cached) return cached;
    let outs: string[] = [];
    try {
      if (row.nar_size <= MAX_DRV_NAR) {
        const text = this.objectFile(row.nar_hash, row.path, MAX_DRV_NAR).toString('latin1');
        const drv = parseDerivation(text, drvNameFromPath(row.path, this.storeDir), {
          storeDir: this.storeDir,
        });
        outs = [...drv.outputs.values()].map((o) => o.path).filter((p) => p !== '');
      }
    } catch (e) {
      this.logger?.debug({ path: row.path, err: errorMessage(e) }, 'cannot read derivation outputs');
    }
    if (this.drvOutputsCache.size >= 4096) this.drvOutputsCache.clear();
    this.drvOutputsCache.set(row.nar_hash, outs);
    return outs;
  }

  stats(): StoreStats {
    const o = this.db.prepare('SELECT count(*) AS n, coalesce(sum(nar_size), 0) AS b FROM objects').get() as {
      n: number;
      b: number;
    };
    const byScope: Record<string, number> = {};
    let paths = 0;
    for (const r of this.db.prepare('SELECT scope, count(*) AS n FROM paths GROUP BY scope').all() as Array<{
      scope: string;
      n: number;
    }>) {
      byScope[scopeOfKey(r.scope)] = r.n;
      paths += r.n;
    }
    const inlineObjects = this.db.prepare('SELECT count(*) FROM inline_nars').pluck().get() as number;
    return {
      objects: o.n,
      inlineObjects,
      bytes: o.b,
      paths,
      pathsByScope: byScope,
      tempRootHolders: this.tempRoots.size,
    };
  }

  // -------------------------------------------------------------------------------------------------------------
  // Import
  // -------------------------------------------------------------------------------------------------------------

  private newTmpName(prefix: string): string {
    return join(this.tmpDir, `${prefix}-${process.pid}-${++this.holderSeq}-${randomHex(6)}`);
  }

  /** A fresh empty directory under `tmpDir` (same file system as the objects), e.g. for a build's outputs. */
  buildTmpDir(prefix = 'build'): string {
    return mkdtempSync(join(this.tmpDir, `${prefix}-`));
  }

  /** Validate the shape of a path info coming from a client or a build. */
  private checkNewInfo(info: NewPathInfo): StorePath {
    const what = `path info for '${info.path}'`;
    let sp: StorePath;
    try {
      sp = StorePath.parse(info.path, this.storeDir);
      if (info.deriver !== null && info.deriver !== '') StorePath.parse(info.deriver, this.storeDir);
      for (const r of info.references) StorePath.parse(r, this.storeDir);
    } catch (e) {
      throw new StoreError(`invalid ${what}: ${errorMessage(e)}`);
    }
    if (!(info.narHash instanceof Hash) || info.narHash.algo !== 'sha256') {
      throw new StoreError(`invalid ${what}: the NAR hash must be sha256`);
    }
    if (!Number.isSafeInteger(info.narSize) || info.narSize <= 0) {
      throw new StoreError(`invalid ${what}: NAR size ${info.narSize} is not a positive integer`);
    }
    return sp;
  }

  /** References of `info` that are neither valid in the view, nor in `batch`, nor the path itself. */
  private missingReferences(uk: string, info: NewPathInfo, batch?: ReadonlySet<string>): string[] {
    return info.references.filter((r) => r !== info.path && !batch?.has(r) && this.sInView.get(r, uk) === undefined);
  }

  /**
   * Import one NAR for `user`. The NAR is streamed into `tmp/` while hashed; its hash and size must equal the declared
   * ones, references must be valid in the view (or in `batch`, or the path itself), a `ca` must match the contents.
   * Only then are object and row registered, in one transaction. On any failure nothing is registered and no file is
   * left; the NAR may then be partly unread. When the path is already valid in the view, the NAR is still read and
   * checked, and nothing is duplicated. Returns the path info now in the user's view.
   */
  async addToStoreNar(user: string, info: NewPathInfo, nar: WireReader, opts: AddOptions = {}): Promise<PathInfo> {
    const uk = userKey(user);
    const sp = this.checkNewInfo(info);
    const path = info.path;
    const missing = this.missingReferences(uk, info, opts.batch);
    if (missing.length > 0) {
      throw new StoreError(
        `cannot import path '${path}': its reference '${missing[0]}' is not valid on this box (upload it first)`,
      );
    }
    if (opts.holder !== undefined) {
      for (const r of info.references) if (r !== path) this.addTempRoot(opts.holder, r);
    }

    let ca: ContentAddress | undefined;
    if (info.ca !== null && info.ca !== '') {
      try {
        ca = parseContentAddress(info.ca);
      } catch (e) {
        throw new StoreError(`cannot import path '${path}': ${errorMessage(e)}`);
      }
    }
    // A recursive content address with another algorithm than sha256 is checked on the NAR bytes as they stream by.
    const extraSink = ca?.method === 'recursive' && ca.hash.algo !== 'sha256' ? new HashSink(ca.hash.algo) : undefined;
    const narOpts = {
      maxSize: info.narSize,
      signal: opts.signal,
      ...(extraSink ? { onChunk: (b: Buffer) => void extraSink.update(b) } : {}),
    };

    // Already valid in the view, and this upload cannot make it public: only read and check the NAR (the caller's
    // stream must stay in sync), without keeping it.
    const existing = this.sViewRow.get(path, uk);
    const keep = existing === undefined || (this.sRow.get(path, PUBLIC) === undefined && this.couldBePublic(info));
    // A small NAR is kept whole in memory and then in the database; a larger one is extracted into tmp/ as it arrives.
    const inline = keep && info.narSize <= this.inlineMaxNar;
    const needTree = keep && !inline;
    const chunks: Buffer[] = [];
    if (inline) {
      const onChunk = narOpts.onChunk;
      narOpts.onChunk = (b: Buffer) => {
        chunks.push(b);
        onChunk?.(b);
      };
    }
    const dest = this.newTmpName('import');
    /** The extracted tree now belongs to objects/ (nothing to clean up). */
    let moved = false;
    let summary: { narHash: Buffer; narSize: number };
    try {
      // `dest` is a fresh name in tmp/, which only this store uses: no need for a second temporary name and rename.
      summary = needTree ? await restoreNar(nar, dest, { ...narOpts, direct: true }) : await parseNar(nar, narOpts);
    } catch (e) {
      if (needTree) await removeTree(dest).catch(() => {});
      throw new StoreError(`cannot import path '${path}': ${errorMessage(e)}`, { cause: e });
    }
    const src = inline ? Buffer.concat(chunks, summary.narSize) : dest;

    try {
      const gotHash = new Hash('sha256', summary.narHash);
      if (!gotHash.equals(info.narHash)) {
        throw new HashMismatchError(
          `hash mismatch importing path '${path}': declared ${info.narHash.toString('nix32')}, got ${gotHash.toString('nix32')}`,
        );
      }
      if (summary.narSize !== info.narSize) {
        throw new HashMismatchError(
          `size mismatch importing path '${path}': declared ${info.narSize} bytes, got ${summary.narSize}`,
        );
      }
      if (!keep) {
        this.logger?.debug({ user, path }, 'path already valid; NAR consumed');
        if (opts.holder !== undefined) this.addTempRoot(opts.holder, path);
        return this.toInfo(this.sViewRow.get(path, uk) ?? existing!);
      }

      let caVerified = false;
      if (ca !== undefined) {
        const v = await this.verifyContentAddress(sp, info, ca, src, extraSink);
        if (v === 'mismatch') {
          throw new HashMismatchError(
            `content address mismatch importing path '${path}': its contents do not match '${info.ca}'`,
          );
        }
        caVerified = v === 'ok';
      }
      const validSigs = validPathInfoSignatures({ ...info, sigs: info.sigs ?? [] }, this.trusted);
      const wantPublic = validSigs.length > 0 || (caVerified && this.shareCA);

      const result = this.commit(uk, info, src, wantPublic, validSigs, opts.batch, false, () => {
        moved = true;
      });
      if (opts.holder !== undefined) this.addTempRoot(opts.holder, path);
      this.logger?.debug(
        { user, path, scope: result.scope, narSize: info.narSize, signed: validSigs.length > 0 },
        'imported path',
      );
      return result;
    } finally {
      // Whatever was not moved into objects/ (a duplicate, or a failed import) goes.
      if (needTree && !moved) await removeTree(dest).catch(() => {});
    }
  }

  /** Might this upload become public (before checking its contents)? Decides whether a known path is re-extracted. */
  private couldBePublic(info: NewPathInfo): boolean {
    if (validPathInfoSignatures({ ...info, sigs: info.sigs ?? [] }, this.trusted).length > 0) return true;
    return this.shareCA && info.ca !== null && info.ca !== '';
  }

  /**
   * Check that the contents (`src`: the extracted tree, or the whole NAR of an inline object) match the content
   * address. 'ok' if they do, 'mismatch' if they do not, 'unchecked' for methods this box cannot verify (git
   * hashing): such paths simply stay private.
   */
  private async verifyContentAddress(
    sp: StorePath,
    info: NewPathInfo,
    ca: ContentAddress,
    src: string | Buffer,
    extraSink: HashSink | undefined,
  ): Promise<'ok' | 'mismatch' | 'unchecked'> {
    if (ca.method === 'git') return 'unchecked';
    let actual: Hash;
    if (ca.method === 'recursive') {
      actual = ca.hash.algo === 'sha256' ? info.narHash : extraSink!.finish().hash;
    } else if (typeof src !== 'string') {
      // flat and text: a single regular, non-executable file.
      const f = narRegularFile(src);
      if (f === undefined || f.executable) return 'mismatch';
      actual = hashBytes(ca.hash.algo, f.contents);
    } else {
      const st = await lstat(src);
      if (!st.isFile() || (st.mode & 0o111) !== 0) return 'mismatch';
      actual = (await hashStream(ca.hash.algo, createReadStream(src))).hash;
    }
    if (!actual.equals(ca.hash)) return 'mismatch';
    const self = info.references.includes(info.path);
    const refs = info.references.filter((r) => r !== info.path);
    let expected: string;
    try {
      expected = makeFixedOutputPath(sp.name, ca, refs, self, this.storeDir);
    } catch {
      return 'mismatch';
    }
    return expected === info.path ? 'ok' : 'mismatch';
  }

  /**
   * Register one verified object (synchronously, in one transaction). `src` is its extracted tree, moved into
   * objects/, or its whole NAR, kept inline — unless that content is already there. Returns the info now in the
   * user's view.
   */
  private commit(
    uk: string,
    info: NewPathInfo,
    src: string | Buffer,
    wantPublic: boolean,
    sigs: string[],
    batch: ReadonlySet<string> | undefined,
    ultimate: boolean,
    onMoved?: () => void,
  ): PathInfo {
    const hash = info.narHash.toNix32();
    const objectPath = join(this.objectsDir, hash);
    let moved = false;
    try {
      const row = this.inTx((): Row | PathInfo => {
        const missing = this.missingReferences(uk, info, batch);
        if (missing.length > 0) {
          throw new StoreError(
            `cannot import path '${info.path}': its reference '${missing[0]}' is no longer valid on this box`,
          );
        }
        let scope = wantPublic ? PUBLIC : uk;
        if (scope === PUBLIC) {
          // A public object needs a public closure; otherwise it is only valid for its uploader.
          const notPublic = info.references.some((r) => r !== info.path && !this.sRow.get(r, PUBLIC));
          if (notPublic) scope = uk;
        }
        let existingPublic: Row | undefined;
        let existingPrivate: Row | undefined;
        for (const r of this.sRowsOfPath.all(info.path, uk)) {
          if (r.scope === PUBLIC) existingPublic = r;
          else existingPrivate = r;
        }
        if (scope === PUBLIC && existingPublic) {
          if (existingPublic.nar_hash === hash) this.mergeSigs(existingPublic, sigs);
          return this.sViewRow.get(info.path, uk)!;
        }
        if (scope !== PUBLIC && (existingPrivate || existingPublic)) {
          // Already valid in the view: keep what is there (like Nix).
          return this.sViewRow.get(info.path, uk)!;
        }
        if (this.sInsertNewObject.run(hash, info.narSize, nowSeconds()).changes === 1) {
          if (typeof src !== 'string') this.sInsertInline.run(hash, src);
          else {
            // A new object: its tree moves in (if that fails, the transaction and so the insert are undone).
            moveIntoObjects(src, objectPath, renameTree);
            moved = true;
          }
        }
        const now = nowSeconds();
        const regTime = info.registrationTime && info.registrationTime > 0 ? info.registrationTime : now;
        const id = Number(
          this.sInsertRow.run(
            info.path,
            scope,
            StorePath.parse(info.path, this.storeDir).hashPart,
            hash,
            info.narSize,
            info.deriver || null,
            regTime,
            ultimate ? 1 : 0,
            JSON.stringify(sigs),
            info.ca || null,
            now,
          ).lastInsertRowid,
        );
        const refs = new Set(info.references);
        for (const r of refs) this.sInsertRef.run(id, r);
        if (scope === PUBLIC && existingPrivate && existingPrivate.nar_hash === hash) {
          // The user's private copy of the same object is now redundant.
          this.sDeleteRow.run(existingPrivate.id);
        }
        if (scope === PUBLIC && existingPrivate && existingPrivate.nar_hash !== hash) {
          return this.sViewRow.get(info.path, uk)!; // the user's own, different object stays their view
        }
        // The row just inserted is the view: its info is what was written (references sorted like `sRefs`, which
        // compares bytes; store paths are ASCII).
        return {
          path: info.path,
          deriver: info.deriver || null,
          narHash: new Hash('sha256', Buffer.from(info.narHash.digest)),
          narSize: info.narSize,
          references: [...refs].sort(),
          registrationTime: regTime,
          ultimate,
          sigs: [...sigs],
          ca: info.ca || null,
          scope: scopeOfKey(scope),
        };
      });
      if (moved) onMoved?.();
      return 'hash_part' in row ? this.toInfo(row) : row;
    } catch (e) {
      if (moved && typeof src === 'string') {
        try {
          renameTree(objectPath, src);
        } catch {
          removeTreeSync(objectPath);
        }
      }
      throw e;
    }
  }

  private mergeSigs(row: Row, sigs: string[]): void {
    const old = JSON.parse(row.sigs) as string[];
    const merged = [...new Set([...old, ...sigs])];
    if (merged.length !== old.length) this.sUpdateSigs.run(JSON.stringify(merged), row.id);
  }

  // -------------------------------------------------------------------------------------------------------------
  // Export
  // -------------------------------------------------------------------------------------------------------------

  /**
   * The NAR of `path` as in `user`'s view, streamed from disk. Throws at once if the path is not valid for them. The
   * path is held (temporary root) while the stream is open. With `recycle`, chunks are lent (see `dumpPath`).
   */
  narFromPath(user: string, path: string, opts: { recycle?: boolean } = {}): AsyncGenerator<Buffer> {
    const row = this.viewRow(user, path);
    if (!row) throw new StoreError(`path '${path}' is not valid`);
    const holder = `nar:${++this.holderSeq}`;
    this.addTempRoot(holder, path);
    const dir = join(this.objectsDir, row.nar_hash);
    const inline = this.sInlineNar.get(row.nar_hash);
    const self = this;
    return (async function* () {
      try {
        if (inline !== undefined) yield inline;
        else yield* dumpPath(dir, { recycle: opts.recycle === true });
      } finally {
        self.releaseTempRoots(holder);
      }
    })();
  }

  // -------------------------------------------------------------------------------------------------------------
  // Build outputs
  // -------------------------------------------------------------------------------------------------------------

  /**
   * Register build outputs: each `fsPath` (a canonicalised tree, ideally under `buildTmpDir()`) is moved into
   * objects/ and all rows are registered in one transaction, in `scope` ('public' or `user`). References must be
   * valid in the user's view or be among the outputs. Public outputs are signed with the box's key if it has one.
   * A path already registered in that scope is kept as it is (its new tree is discarded).
   */
  registerOutputs(user: string, outputs: Array<{ info: NewPathInfo; fsPath: string }>, scope: Scope): PathInfo[] {
    const uk = userKey(user);
    const sk = scope === PUBLIC ? PUBLIC : userKey(scope);
    for (const { info } of outputs) this.checkNewInfo(info);
    const batch = new Set(outputs.map((o) => o.info.path));
    const movedIn: Array<{ from: string; to: string }> = [];
    const discard: string[] = [];
    let result: PathInfo[];
    try {
      result = this.inTx(() => {
        const rows: Row[] = [];
        for (const { info, fsPath } of outputs) {
          const missing = this.missingReferences(uk, info, batch);
          if (missing.length > 0) {
            throw new StoreError(`cannot register output '${info.path}': its reference '${missing[0]}' is not valid`);
          }
          if (sk === PUBLIC) {
            const notPublic = info.references.find((r) => !batch.has(r) && !this.sRow.get(r, PUBLIC));
            if (notPublic) {
              throw new StoreError(
                `cannot register output '${info.path}' as public: its reference '${notPublic}' is not public`,
              );
            }
          }
          const existing = this.sRow.get(info.path, sk);
          if (existing) {
            discard.push(fsPath);
            rows.push(existing);
            continue;
          }
          const hash = info.narHash.toNix32();
          const objectPath = join(this.objectsDir, hash);
          if (this.sObject.get(hash)) discard.push(fsPath);
          else {
            if (existsSync(objectPath)) removeTreeSync(objectPath);
            moveTree(fsPath, objectPath);
            movedIn.push({ from: fsPath, to: objectPath });
            this.sInsertObject.run(hash, info.narSize, nowSeconds());
          }
          const sigs = [...(info.sigs ?? [])];
          if (sk === PUBLIC && this.signingKey) sigs.push(signPathInfo(info, this.signingKey));
          const now = nowSeconds();
          const id = Number(
            this.sInsertRow.run(
              info.path,
              sk,
              StorePath.parse(info.path, this.storeDir).hashPart,
              hash,
              info.narSize,
              info.deriver || null,
              info.registrationTime && info.registrationTime > 0 ? info.registrationTime : now,
              (info.ultimate ?? true) ? 1 : 0,
              JSON.stringify([...new Set(sigs)]),
              info.ca || null,
              now,
            ).lastInsertRowid,
          );
          for (const r of new Set(info.references)) this.sInsertRef.run(id, r);
          if (sk === PUBLIC) {
            const priv = this.sRow.get(info.path, uk);
            if (priv && priv.nar_hash === hash) this.sDeleteRow.run(priv.id);
          }
          rows.push(this.sRow.get(info.path, sk)!);
        }
        return rows.map((r) => this.toInfo(r));
      });
    } catch (e) {
      for (const m of movedIn.reverse()) {
        try {
          renameTree(m.to, m.from);
        } catch {
          removeTreeSync(m.to);
        }
      }
      throw e;
    }
    for (const d of discard) removeTreeSync(d);
    this.logger?.debug({ user, scope, outputs: result.map((r) => r.path) }, 'registered build outputs');
    return result;
  }

  // -------------------------------------------------------------------------------------------------------------
  // GC
  // -------------------------------------------------------------------------------------------------------------

  /** `holder` (a session or build id) holds `path` and, through it, its closure, until `releaseTempRoots(holder)`. */
  addTempRoot(holder: string, path: string): void {
    let set = this.tempRoots.get(holder);
    if (!set) {
      set = new Set();
      this.tempRoots.set(holder, set);
    }
    set.add(path);
  }

  /** Drop the holder's roots; the paths count as used now (for the retention window). */
  releaseTempRoots(holder: string): void {
    const set = this.tempRoots.get(holder);
    if (!set) return;
    this.tempRoots.delete(holder);
    if (this.closed) return;
    const now = nowSeconds();
    this.inTx(() => {
      for (const p of set) this.sTouch.run(now, p);
    });
  }

  /** Remove the private rows of `user` at the next GC (except what a live holder still holds). */
  dropUser(user: string): void {
    this.droppedUsers.add(user);
  }

  /**
   * Delete rows not reachable from live temp roots or from rows used within the retention window (per row, following
   * references in each row's view), then objects no row uses. Private rows of users who left the registry are not
   * roots. With `maxBytes`, the retention window shrinks until what is kept fits (live holders are always kept).
   */
  async gc(opts: GcOptions): Promise<GcResult> {
    const now = opts.now ?? nowSeconds();
    const known = opts.knownUsers ?? this.knownUsers;
    const trash = this.newTmpName('gc');
    const res = this.inTx((): GcResult & { hashes: string[] } => {
      const rows = this.db.prepare('SELECT id, path, scope, nar_hash, last_used FROM paths').all() as Array<
        Pick<Row, 'id' | 'path' | 'scope' | 'nar_hash' | 'last_used'>
      >;
      const refRows = this.db.prepare('SELECT referrer, reference FROM refs').all() as Array<{
        referrer: number;
        reference: string;
      }>;
      const sizes = new Map<string, number>();
      for (const o of this.db.prepare('SELECT hash, nar_size FROM objects').all() as Array<{
        hash: string;
        nar_size: number;
      }>) {
        sizes.set(o.hash, o.nar_size);
      }
      const byPath = new Map<string, typeof rows>();
      for (const r of rows) {
        const l = byPath.get(r.path);
        if (l) l.push(r);
        else byPath.set(r.path, [r]);
      }
      const refsOf = new Map<number, string[]>();
      for (const r of refRows) {
        const l = refsOf.get(r.referrer);
        if (l) l.push(r.reference);
        else refsOf.set(r.referrer, [r.reference]);
      }
      const gone = (scope: string): boolean => {
        if (scope === PUBLIC) return false;
        const u = scope.slice(2);
        return this.droppedUsers.has(u) || (known !== undefined && !known(u));
      };
      const mark = (roots: Iterable<(typeof rows)[number]>): Set<number> => {
        const keep = new Set<number>();
        const stack = [...roots];
        while (stack.length > 0) {
          const r = stack.pop()!;
          if (keep.has(r.id)) continue;
          keep.add(r.id);
          for (const ref of refsOf.get(r.id) ?? []) {
            for (const x of byPath.get(ref) ?? []) {
              // A row's references resolve in its own view: the public row, or a private row of the same scope.
              if (!keep.has(x.id) && (x.scope === PUBLIC || x.scope === r.scope)) stack.push(x);
            }
          }
        }
        return keep;
      };
      const held = new Set<string>();
      for (const set of this.tempRoots.values()) for (const p of set) held.add(p);
      const liveRoots = [...held].flatMap((p) => byPath.get(p) ?? []);
      const keptBytesOf = (keep: Set<number>): number => {
        const hs = new Set<string>();
        for (const r of rows) if (keep.has(r.id)) hs.add(r.nar_hash);
        let b = 0;
        for (const h of hs) b += sizes.get(h) ?? 0;
        return b;
      };
      const keepWith = (cutoff: number): Set<number> =>
        mark([...liveRoots, ...rows.filter((r) => r.last_used >= cutoff && !gone(r.scope))]);

      let keep = keepWith(now - opts.retentionSeconds);
      if (opts.maxBytes !== undefined && opts.maxBytes > 0 && keptBytesOf(keep) > opts.maxBytes) {
        // Shrink the window: the smallest cutoff (most kept) whose kept set fits the budget.
        const cutoffs = [...new Set(rows.map((r) => r.last_used + 1))]
          .filter((c) => c > now - opts.retentionSeconds)
          .sort((a, b) => a - b);
        let lo = 0;
        let hi = cutoffs.length - 1;
        let best: Set<number> | undefined;
        while (lo <= hi) {
          const mid = (lo + hi) >> 1;
          const k = keepWith(cutoffs[mid]!);
          if (keptBytesOf(k) <= opts.maxBytes) {
            best = k;
            hi = mid - 1;
          } else lo = mid + 1;
        }
        keep = best ?? mark(liveRoots);
      }

      let deletedPaths = 0;
      for (const r of rows) {
        if (!keep.has(r.id)) {
          this.sDeleteRow.run(r.id);
          deletedPaths++;
        }
      }
      const dead = this.db
        .prepare(
          `SELECT hash, nar_size, EXISTS (SELECT 1 FROM inline_nars i WHERE i.hash = objects.hash) AS inline
           FROM objects WHERE NOT EXISTS (SELECT 1 FROM paths p WHERE p.nar_hash = objects.hash)`,
        )
        .all() as Array<{ hash: string; nar_size: number; inline: number }>;
      const delObj = this.db.prepare('DELETE FROM objects WHERE hash = ?');
      let freedBytes = 0;
      for (const o of dead) {
        delObj.run(o.hash);
        freedBytes += o.nar_size;
      }
      return {
        deletedPaths,
        deletedObjects: dead.length,
        freedBytes,
        keptPaths: rows.length - deletedPaths,
        keptBytes: keptBytesOf(keep),
        // Inline objects are on disk only if a build needed them there (their NAR row went with the object row).
        hashes: dead.filter((o) => !o.inline || lexists(join(this.objectsDir, o.hash))).map((o) => o.hash),
      };
    });
    // Still in the same tick as the transaction: move the dead objects out of objects/ before anything can look.
    if (res.hashes.length > 0) {
      mkdirSync(trash, { mode: 0o700 });
      for (const h of res.hashes) {
        try {
          renameTree(join(this.objectsDir, h), join(trash, h));
        } catch (e) {
          this.logger?.warn({ object: h, err: errorMessage(e) }, 'object directory missing at GC');
        }
      }
    }
    for (const u of this.droppedUsers) {
      if (!this.db.prepare('SELECT 1 FROM paths WHERE scope = ? LIMIT 1').get(userKey(u))) this.droppedUsers.delete(u);
    }
    await removeTree(trash);
    const { hashes: _, ...result } = res;
    this.logger?.info(result, 'garbage collection');
    return result;
  }
}

/**
 * Rename a file system object to another directory. A read-only directory (canonical 0555) cannot be moved to a new
 * parent by a non-root owner (its `..` entry must be rewritten), so when the plain rename is refused, it is made
 * writable for the move and restored.
 */
function renameTree(from: string, to: string): void {
  try {
    renameSync(from, to);
    return;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'EACCES' && code !== 'EPERM') throw e;
  }
  const st = lstatSync(from);
  if (!st.isDirectory() || (st.mode & 0o200) !== 0) {
    renameSync(from, to);
    return;
  }
  chmodSync(from, st.mode | 0o200);
  try {
    renameSync(from, to);
  } catch (e) {
    chmodSync(from, st.mode & 0o7777);
    throw e;
  }
  chmodSync(to, st.mode & 0o7777);
}

/**
 * `move(from, to)` into objects/, where `to` is normally free. Something already there is a stray leftover unknown to
 * the database: a rename replaces a file in one step; anything a rename cannot replace is removed first.
 */
function moveIntoObjects(from: string, to: string, move: (from: string, to: string) => void): void {
  try {
    move(from, to);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'EEXIST' && code !== 'ENOTEMPTY' && code !== 'EISDIR' && code !== 'ENOTDIR') throw e;
    removeTreeSync(to);
    move(from, to);
  }
}

/** Move a tree into the store: a rename, or a copy (keeping modes, times and symlinks) across file systems. */
function moveTree(from: string, to: string): void {
  try {
    renameTree(from, to);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EXDEV') throw e;
    cpSync(from, to, { recursive: true, preserveTimestamps: true, verbatimSymlinks: true, errorOnExist: true });
    removeTreeSync(from);
  }
}
