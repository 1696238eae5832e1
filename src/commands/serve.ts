/** `buildbox serve` and `buildbox fingerprint`. */
import { createReadStream, existsSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import type { Command } from 'commander';
import { readSigningPublicKey, startBox } from '../box.js';
import { buildLogDir } from '../build.js';
import { type Config, loadConfig } from '../config.js';
import { knownHostsLine, loadOrCreateHostKey } from '../host-key.js';
import { createLogger } from '../logger.js';

const PID_FILE = 'buildbox.pid';

interface CommonOpts {
  config?: string;
  stateDir?: string;
}

function configFrom(opts: CommonOpts & { listen?: string; port?: string; persist?: boolean }): Config {
  const overrides: Partial<Config> = {};
  const c = loadConfig(opts.config ?? null);
  if (opts.stateDir) overrides.stateDir = opts.stateDir;
  if (opts.listen) overrides.listen = opts.listen;
  if (opts.port !== undefined) {
    const n = Number(opts.port);
    if (!Number.isInteger(n) || n < 0 || n > 65535) throw new Error(`--port must be a port number, got '${opts.port}'`);
    overrides.port = n;
  }
  if (opts.persist) overrides.persist = true;
  return { ...c, ...overrides, stateDir: overrides.stateDir ? resolvePath(overrides.stateDir) : c.stateDir };
}

function resolvePath(p: string): string {
  return p.startsWith('/') ? p : `${process.cwd()}/${p}`;
}

export function registerServeCommands(program: Command): void {
  program
    .command('serve')
    .description('run the box: SSH front door for ssh:// and ssh-ng:// clients, builds, status page')
    .option('-c, --config <file>', 'TOML config file (default: embedded defaults)')
    .option('--state-dir <dir>', 'state directory (default ./.buildbox)')
    .option('--listen <address>', 'address to listen on (default 127.0.0.1)')
    .option('-p, --port <port>', 'SSH port (default 2222)')
    .option('--persist', 'keep the store across restarts (default: wiped at every start)')
    .action(async (opts: CommonOpts & { listen?: string; port?: string; persist?: boolean }) => {
      const config = configFrom(opts);
      const logger = createLogger();
      const box = await startBox(config, logger);
      const pidFile = join(config.stateDir, PID_FILE);
      writeFileSync(pidFile, `${process.pid}\n`);
      const host = config.listen === '0.0.0.0' || config.listen === '::' ? 'HOST' : config.listen;
      process.stderr.write(
        `buildbox listening on ${box.ssh.address}:${box.port}\n` +
          `host key fingerprint: ${box.hostKey.fingerprint}\n` +
          `known_hosts line:     ${knownHostsLine(box.hostKey, host, box.port)}\n` +
          `signing public key:   ${box.signingKey.publicKey.toString()}\n` +
          (box.status ? `status page:          http://${config.statusListen}:${box.status.port}/\n` : ''),
      );
      await new Promise<void>((resolve) => {
        const stop = (sig: string) => {
          logger.info({ signal: sig }, 'shutting down');
          rmSync(pidFile, { force: true });
          box.close().then(resolve, resolve);
        };
        process.once('SIGINT', () => stop('SIGINT'));
        process.once('SIGTERM', () => stop('SIGTERM'));
        process.on('SIGHUP', () => {
          logger.info('SIGHUP: reloading the registry');
          box.registry.reload().catch((e: Error) => logger.error({ err: e.message }, 'reload failed'));
        });
      });
    });

  program
    .command('reload')
    .description('make the running box re-read its registry now (fetching it when it follows git); same as SIGHUP')
    .option('-c, --config <file>', 'TOML config file')
    .option('--state-dir <dir>', 'state directory (default ./.buildbox)')
    .action((opts: CommonOpts) => {
      const config = configFrom(opts);
      const pidFile = join(config.stateDir, PID_FILE);
      let pid: number;
      try {
        pid = Number(readFileSync(pidFile, 'utf8').trim());
      } catch {
        throw new Error(
          `no running box found: ${pidFile} does not exist (is \`buildbox serve\` running with this state dir?)`,
        );
      }
      try {
        process.kill(pid, 'SIGHUP');
      } catch {
        throw new Error(`no running box found: process ${pid} from ${pidFile} is gone`);
      }
      process.stdout.write(`asked the box (pid ${pid}) to reload its registry\n`);
    });

  program
    .command('log')
    .description("print the box's copy of a build log (kept compressed per user under <state-dir>/logs)")
    .argument('<drv>', 'the derivation path (or its base name)')
    .option('-u, --user <name>', 'whose build (needed when several users built it)')
    .option('-c, --config <file>', 'TOML config file')
    .option('--state-dir <dir>', 'state directory (default ./.buildbox)')
    .action(async (drv: string, opts: CommonOpts & { user?: string }) => {
      const config = configFrom(opts);
      const logDir = join(config.stateDir, 'logs');
      const base = basename(drv);
      if (!/^[0-9a-z]{32}-.+\.drv$/.test(base)) throw new Error(`'${drv}' is not a derivation path`);
      const users = opts.user ? [opts.user] : existsSync(logDir) ? readdirSync(logDir) : [];
      const found = users.map((u) => join(buildLogDir(logDir, u), `${base}.gz`)).filter((f) => existsSync(f));
      if (found.length === 0)
        throw new Error(`no build log of ${base} on this box${opts.user ? ` for ${opts.user}` : ''}`);
      if (found.length > 1) {
        throw new Error(
          `${found.length} users built ${base}; pick one with --user (${found.map((f) => basename(dirname(f))).join(', ')})`,
        );
      }
      await pipeline(createReadStream(found[0]!), createGunzip(), process.stdout);
    });

  program
    .command('fingerprint')
    .description("print the box's host key fingerprint, known_hosts line and signing public key")
    .option('-c, --config <file>', 'TOML config file')
    .option('--state-dir <dir>', 'state directory (default ./.buildbox)')
    .option('--host <name>', 'host name clients use, for the known_hosts line')
    .option('-p, --port <port>', 'SSH port clients use')
    .option('--json', 'machine-readable output')
    .action((opts: CommonOpts & { host?: string; port?: string; json?: boolean }) => {
      const config = configFrom({ config: opts.config, stateDir: opts.stateDir, port: opts.port });
      const hostKey = loadOrCreateHostKey(config.stateDir);
      const signing = readSigningPublicKey(config.stateDir);
      const host = opts.host ?? (config.listen === '0.0.0.0' ? 'HOST' : config.listen);
      const line = knownHostsLine(hostKey, host, config.port);
      if (opts.json) {
        process.stdout.write(
          `${JSON.stringify({ fingerprint: hostKey.fingerprint, publicKey: hostKey.publicKey, knownHosts: line, signingKey: signing?.toString() ?? null })}\n`,
        );
        return;
      }
      process.stdout.write(
        `host key fingerprint: ${hostKey.fingerprint}\nknown_hosts line:     ${line}\n` +
          `signing public key:   ${signing?.toString() ?? '(not generated yet: start the box once)'}\n`,
      );
    });
}
