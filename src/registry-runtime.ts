/**
 * The registry as the running box uses it: a directory followed for changes (RegistryWatcher), or a git repository
 * followed by fetching (GitRegistrySource) whose checked commits are applied. The rest of the box only asks the
 * questions below, so it never cares where the registry came from.
 */
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import {
  findUserKey,
  formatProblem,
  type Registry as RegistryData,
  type RegistryError,
  RegistryWatcher,
} from './registry.js';
import { GitRegistrySource, type RejectedCommit } from './registry-git.js';

export interface RegistryStatus {
  source: string;
  users: number;
  loadedAt: string;
  digest: string;
  problems: number;
  lastError: string | null;
  [k: string]: unknown;
}

interface Follower {
  readonly registry: RegistryData;
  reload(): Promise<unknown>;
  close(): void | Promise<void>;
  status?(): object;
}

/**
 * Keys the built-in server cannot take (FIDO `sk-` keys, cert-authority lines, from=/command= restrictions) are
 * kept for the OpenSSH front door; say so in the log rather than dropping them silently.
 */
function logUnusableKeys(r: RegistryData, logger: Logger): void {
  for (const u of r.users.values()) {
    for (const k of u.unusableKeys) {
      logger.info(
        { user: u.name, key: k.fingerprint, type: k.type, file: u.keyFile, line: k.line, reason: k.unusableReason },
        'key kept for the OpenSSH front door only',
      );
    }
  }
}

export class Registry {
  private constructor(
    private readonly follower: Follower,
    private readonly sourceName: string,
    private readonly lastErrorOf: () => string | null,
  ) {}

  static async start(config: Config, logger: Logger): Promise<Registry> {
    if (config.registry.git) {
      const src = new GitRegistrySource({
        url: config.registry.git,
        branch: config.registry.branch,
        intervalSeconds: config.registry.interval,
        dir: join(config.stateDir, 'registry-git'),
        logger,
      });
      src.on('rejected', (r: RejectedCommit) =>
        logger.error(
          { commit: r.commit, problems: r.problems },
          'registry commit rejected; keeping the last good registry',
        ),
      );
      src.on('fetch-failed', (message: string) =>
        logger.warn({ err: message }, 'registry fetch failed; keeping the clone we have'),
      );
      src.on('change', (r: RegistryData, _prev: RegistryData, commit: string) =>
        logger.info({ users: r.users.size, commit }, 'registry commit applied'),
      );
      src.on('change', (r: RegistryData) => logUnusableKeys(r, logger));
      await src.start();
      logUnusableKeys(src.registry, logger);
      return new Registry(src, `git ${config.registry.git} (${config.registry.branch})`, () => {
        const st = src.status();
        if (st.rejected) return [`commit ${st.rejected.commit} rejected`, ...st.rejected.problems].join('\n');
        return st.lastError?.message ?? null;
      });
    }
    const watcher = await RegistryWatcher.start({ dir: config.registry.path, logger });
    logUnusableKeys(watcher.registry, logger);
    watcher.on('change', (r: RegistryData) => logUnusableKeys(r, logger));
    watcher.on('rejected', (e: RegistryError) =>
      logger.error(
        { err: e.message, problems: e.problems.map((p) => formatProblem(p)) },
        'registry edit rejected; keeping the last good registry',
      ),
    );
    watcher.on('change', (r: RegistryData) => logger.info({ users: r.users.size }, 'registry reloaded'));
    return new Registry(watcher, config.registry.path, () => {
      const e = watcher.lastError;
      if (!e) return null;
      return [e.message, ...e.problems.filter((p) => p.severity === 'error').map((p) => formatProblem(p))].join('\n');
    });
  }

  private get data(): RegistryData {
    return this.follower.registry;
  }

  isAuthorized(user: string, keyAlgo: string, keyBlob: Buffer): boolean {
    return findUserKey(this.data, user, keyAlgo, keyBlob) !== undefined;
  }

  jobsLimit(user: string): number | undefined {
    return this.data.users.get(user)?.jobs;
  }

  userCount(): number {
    return this.data.users.size;
  }

  knownUsers(): Set<string> {
    return new Set(this.data.users.keys());
  }

  get registry(): RegistryData {
    return this.data;
  }

  status(): RegistryStatus {
    return {
      ...(this.follower.status?.() ?? {}),
      source: this.sourceName,
      users: this.data.users.size,
      loadedAt: this.data.loadedAt.toISOString(),
      digest: this.data.digest,
      problems: this.data.problems.length,
      lastError: this.lastErrorOf(),
    };
  }

  async reload(): Promise<void> {
    await this.follower.reload();
  }

  close(): void {
    void this.follower.close();
  }
}
