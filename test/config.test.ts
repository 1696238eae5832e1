import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ConfigError, defaultConfig, loadConfig, parseDuration, parseSize, systemsOf } from '../src/config.js';
import { tempDir } from './helpers/exec.js';

describe('config', () => {
  const dirs: Array<() => void> = [];
  afterEach(() => {
    for (const c of dirs.splice(0)) c();
  });
  const write = (text: string): string => {
    const t = tempDir();
    dirs.push(t.cleanup);
    const f = join(t.path, 'buildbox.toml');
    writeFileSync(f, text);
    return f;
  };

  it('has embedded defaults that need no file', () => {
    const c = loadConfig(null);
    expect(c.listen).toBe('127.0.0.1');
    expect(c.port).toBe(2222);
    expect(c.stateDir).toBe(join(process.cwd(), '.buildbox'));
    expect(c.persist).toBe(false);
    expect(c.maxJobs).toBeGreaterThan(0);
    expect(c.trustedPublicKeys[0]).toMatch(/^cache\.nixos\.org-1:/);
    expect(c.source).toBeNull();
  });

  it('reads every documented key, relative paths against the file', () => {
    const f = write(`
listen = "0.0.0.0"
port = 2022
state-dir = "state"
persist = true
system = "aarch64-linux"
extra-platforms = ["armv7l-linux"]
max-jobs = 64
cores = 4
supported-features = ["kvm", "big-parallel"]
mandatory-features = ["kvm"]
trusted-public-keys = ["a:AAAA"]
max-silent-time = "5m"
build-timeout = "2h"
max-log-size = "64MiB"
retention = 600
max-store-size = "100G"

[registry]
path = "reg"
git = "https://example.org/registry.git"
branch = "live"
interval = "1m"

[status]
port = 9000
`);
    const c = loadConfig(f);
    expect(c.listen).toBe('0.0.0.0');
    expect(c.port).toBe(2022);
    expect(c.stateDir).toBe(join(f, '..', 'state'));
    expect(c.persist).toBe(true);
    expect(systemsOf(c)).toEqual(['aarch64-linux', 'armv7l-linux']);
    expect(c.maxJobs).toBe(64);
    expect(c.cores).toBe(4);
    expect(c.mandatoryFeatures).toEqual(['kvm']);
    expect(c.maxSilentTime).toBe(300);
    expect(c.buildTimeout).toBe(7200);
    expect(c.maxLogSize).toBe(64 * 1024 * 1024);
    expect(c.maxStoreSize).toBe(100 * 1024 ** 3);
    expect(c.registry).toEqual({
      path: join(f, '..', 'reg'),
      git: 'https://example.org/registry.git',
      branch: 'live',
      interval: 60,
    });
    expect(c.statusPort).toBe(9000);
    expect(c.source).toBe(f);
  });

  it('reports unknown keys and bad values with file:line, all at once', () => {
    const f = write('port = 2022\nmax-jbos = 3\n\n[registry]\nbranch = 5\ncolour = "red"\n');
    let err: Error | undefined;
    try {
      loadConfig(f);
    } catch (e) {
      err = e as Error;
    }
    expect(err).toBeInstanceOf(ConfigError);
    const lines = err!.message.split('\n');
    expect(lines).toHaveLength(3);
    expect(lines[0]).toMatch(new RegExp(`^${f}:2: unknown key 'max-jbos'`));
    expect(lines[1]).toBe(`${f}:5: registry.branch: expected a string, got number`);
    expect(lines[2]).toMatch(new RegExp(`^${f}:6: unknown key 'registry.colour'`));
  });

  it('reports TOML syntax errors with a location, and unreadable files', () => {
    expect(() => loadConfig(write('port = [1,\n'))).toThrow(/buildbox\.toml:\d+:\d+: /);
    expect(() => loadConfig('/nonexistent/buildbox.toml')).toThrow(
      'cannot read config file /nonexistent/buildbox.toml: ENOENT',
    );
  });

  it('parses sizes and durations', () => {
    expect(parseSize('1k')).toBe(1024);
    expect(parseSize('2GiB')).toBe(2 * 1024 ** 3);
    expect(parseSize(12)).toBe(12);
    expect(() => parseSize('lots')).toThrow(/expected a size/);
    expect(parseDuration('90s')).toBe(90);
    expect(parseDuration('2h')).toBe(7200);
    expect(() => parseDuration('-1')).toThrow(/expected a duration/);
    expect(defaultConfig('/x').stateDir).toBe('/x/.buildbox');
  });
});
