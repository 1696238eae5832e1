/**
 * The box's configuration: embedded defaults, optionally overridden by a TOML file. Unknown keys and wrong types are
 * errors reported as `file:line: message`, so a typo never silently falls back to a default.
 */
import { readFileSync } from 'node:fs';
import { availableParallelism, hostname } from 'node:os';
import { dirname, resolve } from 'node:path';
import { parse as parseToml } from 'smol-toml';

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

export interface RegistryConfig {
  /** Directory holding users.nix and keys/. */
  path: string;
  /** Follow this git repository instead of (into) a local directory. */
  git: string | null;
  branch: string;
  /** Seconds between fetches. */
  interval: number;
}

export interface Config {
  listen: string;
  port: number;
  stateDir: string;
  persist: boolean;
  registry: RegistryConfig;
  system: string;
  extraPlatforms: string[];
  maxJobs: number;
  /** Build slot i runs as host uid buildUidBase + i; the range must be reserved for the box. */
  buildUidBase: number;
  cores: number;
  supportedFeatures: string[];
  mandatoryFeatures: string[];
  trustedPublicKeys: string[];
  shareContentAddressed: boolean;
  /** Box-side caps on the client's limits, in seconds / bytes; 0 = no cap. */
  maxSilentTime: number;
  buildTimeout: number;
  maxLogSize: number;
  /** Seconds an unreferenced path is kept after its last use before GC may remove it. */
  retention: number;
  /** Disk budget for the store in bytes; 0 = unlimited. */
  maxStoreSize: number;
  /** Seconds a connection may take to authenticate. */
  authTimeout: number;
  maxConnections: number;
  /** HTTP status page / JSON API / metrics; null disables it, 0 picks a free port. */
  statusListen: string;
  statusPort: number | null;
  /** Host name used in the signing key name and client configs. */
  hostName: string;
  /** Where the config came from (for messages), or null for the embedded defaults. */
  source: string | null;
}

function defaultSystem(): string {
  const arch = process.arch === 'x64' ? 'x86_64' : process.arch === 'arm64' ? 'aarch64' : process.arch;
  return `${arch}-linux`;
}

export function defaultConfig(cwd = process.cwd()): Config {
  return {
    listen: '127.0.0.1',
    port: 2222,
    stateDir: resolve(cwd, '.buildbox'),
    persist: false,
    registry: { path: resolve(cwd), git: null, branch: 'main', interval: 300 },
    system: defaultSystem(),
    extraPlatforms: [],
    maxJobs: availableParallelism(),
    buildUidBase: 30000,
    cores: availableParallelism(),
    supportedFeatures: ['nixos-test', 'benchmark', 'big-parallel'],
    mandatoryFeatures: [],
    trustedPublicKeys: ['cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY='],
    shareContentAddressed: false,
    maxSilentTime: 3600,
    buildTimeout: 86400,
    maxLogSize: 64 * 1024 * 1024,
    retention: 3600,
    maxStoreSize: 0,
    authTimeout: 30,
    maxConnections: 1000,
    statusListen: '127.0.0.1',
    statusPort: 8222,
    hostName: hostname().split('.')[0] || 'buildbox',
    source: null,
  };
}

type Kind = 'string' | 'int' | 'bool' | 'strings' | 'size' | 'duration';
interface Field {
  key: string;
  kind: Kind;
  set(c: Config, v: unknown, baseDir: string): void;
}

const top: Field[] = [
  { key: 'listen', kind: 'string', set: (c, v) => (c.listen = v as string) },
  { key: 'port', kind: 'int', set: (c, v) => (c.port = checkPort(v as number)) },
  { key: 'state-dir', kind: 'string', set: (c, v, b) => (c.stateDir = resolve(b, v as string)) },
  { key: 'persist', kind: 'bool', set: (c, v) => (c.persist = v as boolean) },
  { key: 'system', kind: 'string', set: (c, v) => (c.system = v as string) },
  { key: 'extra-platforms', kind: 'strings', set: (c, v) => (c.extraPlatforms = v as string[]) },
  { key: 'max-jobs', kind: 'int', set: (c, v) => (c.maxJobs = positive('max-jobs', v as number)) },
  { key: 'build-uid-base', kind: 'int', set: (c, v) => (c.buildUidBase = positive('build-uid-base', v as number)) },
  { key: 'cores', kind: 'int', set: (c, v) => (c.cores = positive('cores', v as number)) },
  { key: 'supported-features', kind: 'strings', set: (c, v) => (c.supportedFeatures = v as string[]) },
  { key: 'mandatory-features', kind: 'strings', set: (c, v) => (c.mandatoryFeatures = v as string[]) },
  { key: 'trusted-public-keys', kind: 'strings', set: (c, v) => (c.trustedPublicKeys = v as string[]) },
  { key: 'share-content-addressed', kind: 'bool', set: (c, v) => (c.shareContentAddressed = v as boolean) },
  { key: 'max-silent-time', kind: 'duration', set: (c, v) => (c.maxSilentTime = v as number) },
  { key: 'build-timeout', kind: 'duration', set: (c, v) => (c.buildTimeout = v as number) },
  { key: 'max-log-size', kind: 'size', set: (c, v) => (c.maxLogSize = v as number) },
  { key: 'retention', kind: 'duration', set: (c, v) => (c.retention = v as number) },
  { key: 'max-store-size', kind: 'size', set: (c, v) => (c.maxStoreSize = v as number) },
  { key: 'auth-timeout', kind: 'duration', set: (c, v) => (c.authTimeout = positive('auth-timeout', v as number)) },
  { key: 'max-connections', kind: 'int', set: (c, v) => (c.maxConnections = positive('max-connections', v as number)) },
  { key: 'host-name', kind: 'string', set: (c, v) => (c.hostName = v as string) },
];
const registryFields: Field[] = [
  { key: 'path', kind: 'string', set: (c, v, b) => (c.registry.path = resolve(b, v as string)) },
  { key: 'git', kind: 'string', set: (c, v) => (c.registry.git = (v as string) || null) },
  { key: 'branch', kind: 'string', set: (c, v) => (c.registry.branch = v as string) },
  {
    key: 'interval',
    kind: 'duration',
    set: (c, v) => (c.registry.interval = positive('registry.interval', v as number)),
  },
];
const statusFields: Field[] = [
  { key: 'listen', kind: 'string', set: (c, v) => (c.statusListen = v as string) },
  { key: 'port', kind: 'int', set: (c, v) => (c.statusPort = c.statusPort === null ? null : checkPort(v as number)) },
  { key: 'enabled', kind: 'bool', set: (c, v) => (c.statusPort = v ? (c.statusPort ?? 8222) : null) },
];

function checkPort(v: number): number {
  if (v < 0 || v > 65535) throw new Error(`port must be between 0 and 65535, got ${v}`);
  return v;
}
function positive(name: string, v: number): number {
  if (v <= 0) throw new Error(`${name} must be positive, got ${v}`);
  return v;
}

const SIZE_UNITS: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 };
const TIME_UNITS: Record<string, number> = { '': 1, s: 1, m: 60, h: 3600, d: 86400 };

/** `64MiB`, `2G`, `1048576` → bytes. */
export function parseSize(v: unknown): number {
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0) return v;
  if (typeof v === 'string') {
    const m = /^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$/i.exec(v);
    if (m) return Number(m[1]) * SIZE_UNITS[m[2]!.toLowerCase()]!;
  }
  throw new Error(`expected a size like 64MiB or a number of bytes, got ${JSON.stringify(v)}`);
}

/** `90s`, `5m`, `2h`, `300` → seconds. */
export function parseDuration(v: unknown): number {
  if (typeof v === 'number' && Number.isInteger(v) && v >= 0) return v;
  if (typeof v === 'string') {
    const m = /^\s*(\d+)\s*([smhd]?)\s*$/i.exec(v);
    if (m) return Number(m[1]) * TIME_UNITS[m[2]!.toLowerCase()]!;
  }
  throw new Error(`expected a duration like 90s, 5m, 2h or a number of seconds, got ${JSON.stringify(v)}`);
}

function coerce(kind: Kind, v: unknown): unknown {
  switch (kind) {
    case 'string':
      if (typeof v !== 'string') throw new Error(`expected a string, got ${typeof v}`);
      return v;
    case 'int':
      if (typeof v !== 'number' && typeof v !== 'bigint') throw new Error(`expected an integer, got ${typeof v}`);
      if (!Number.isSafeInteger(Number(v))) throw new Error(`expected an integer, got ${v}`);
      return Number(v);
    case 'bool':
      if (typeof v !== 'boolean') throw new Error(`expected true or false, got ${JSON.stringify(v)}`);
      return v;
    case 'strings':
      if (!Array.isArray(v) || v.some((x) => typeof x !== 'string')) throw new Error('expected a list of strings');
      return v;
    case 'size':
      return parseSize(typeof v === 'bigint' ? Number(v) : v);
    case 'duration':
      return parseDuration(typeof v === 'bigint' ? Number(v) : v);
  }
}

/** Line (1-based) of `key = …` inside `[table]` (or at top level), for error messages. */
function lineOf(text: string, table: string | null, key: string): number {
  const lines = text.split('\n');
  let current: string | null = null;
  const esc = key.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const keyRe = new RegExp(`^\\s*(?:"${esc}"|${esc})\\s*=`);
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i]!;
    const t = /^\s*\[\s*([^\]]+?)\s*\]/.exec(l);
    if (t) {
      current = t[1]!;
      if (table !== null && current === table && key === '') return i + 1;
      continue;
    }
    if (current === table && keyRe.test(l)) return i + 1;
  }
  return 1;
}

export function loadConfig(file: string | null, overrides: Partial<Config> = {}): Config {
  const config = defaultConfig();
  if (file !== null) {
    const path = resolve(file);
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (e) {
      throw new ConfigError(`cannot read config file ${path}: ${(e as NodeJS.ErrnoException).code ?? String(e)}`);
    }
    applyToml(config, text, path);
    config.source = path;
  }
  Object.assign(config, overrides);
  return config;
}

export function applyToml(config: Config, text: string, path: string): void {
  let doc: Record<string, unknown>;
  try {
    doc = parseToml(text) as Record<string, unknown>;
  } catch (e) {
    const err = e as Error & { line?: number; column?: number };
    const first = err.message.split('\n')[0]!.replace(/^Invalid TOML document: /, '');
    throw new ConfigError(`${path}:${err.line ?? 1}:${err.column ?? 1}: ${first}`);
  }
  const baseDir = dirname(path);
  const problems: string[] = [];
  const applyTable = (table: string | null, obj: Record<string, unknown>, fields: Field[]) => {
    for (const [k, v] of Object.entries(obj)) {
      const f = fields.find((x) => x.key === k);
      const name = table ? `${table}.${k}` : k;
      if (!f) {
        if (table === null && (k === 'registry' || k === 'status') && typeof v === 'object' && v && !Array.isArray(v)) {
          applyTable(k, v as Record<string, unknown>, k === 'registry' ? registryFields : statusFields);
          continue;
        }
        const known = fields.map((x) => x.key).join(', ');
        problems.push(
          `${path}:${lineOf(text, table, k)}: unknown key '${name}' (known keys${table ? ` in [${table}]` : ''}: ${known}${table ? '' : ', [registry], [status]'})`,
        );
        continue;
      }
      try {
        f.set(config, coerce(f.kind, v), baseDir);
      } catch (e) {
        problems.push(`${path}:${lineOf(text, table, k)}: ${name}: ${(e as Error).message}`);
      }
    }
  };
  applyTable(null, doc, top);
  if (problems.length > 0) throw new ConfigError(problems.join('\n'));
}

/** Every system the box builds for. */
export function systemsOf(c: Config): string[] {
  return [c.system, ...c.extraPlatforms.filter((p) => p !== c.system)];
}
