/**
 * The registry from git: a merged pull request goes live by itself. The box keeps a bare clone in its state
 * directory, fetches the branch on an interval and on demand (`refresh()`, wired to `buildbox reload` / SIGHUP),
 * checks a new commit out into a work directory and applies it only if `users check` passes on it. Otherwise the last
 * good registry stays, and the failing commit and its problems are logged and shown by `status()`.
 *
 * It works offline from whatever clone it has: a fetch failure is logged, never fatal. It uses the real `git` binary.
 *
 * Layout under `dir`: `repo.git` (bare; `refs/buildbox/fetched` is the last fetched tip, `refs/buildbox/applied` the
 * last applied commit), `current/` (the applied commit's files, for people to look at), and short-lived `work-*`
 * checkouts.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { AuthorizedKey } from './authorized-keys.js';
import {
  emptyRegistry,
  findUserKey,
  formatProblem,
  loadRegistry,
  type Registry,
  type RegistryLogger,
  type RegistryProvider,
  type User,
} from './registry.js';
import { checkRegistry } from './registry-check.js';

export interface GitRegistryOptions {
  /** Anything `git fetch` takes: https://…, ssh://…, a path to a (bare) repository. */
  url: string;
  branch?: string;
  /** Fetch interval (default 300 s). */
  intervalSeconds?: number;
  /** Fetch interval in ms; overrides intervalSeconds (tests). 0 disables the timer. */
  intervalMs?: number;
  /** Where the clone lives (in the state directory). */
  dir: string;
  usersFile?: string;
  /** `users check` options a commit must pass. */
  strict?: boolean;
  requireVouch?: boolean;
  logger?: RegistryLogger;
  /** The git binary (default `git` from PATH). */
  git?: string;
  /** Kill a fetch that takes longer (default 120 s). */
  fetchTimeoutMs?: number;
}

export type RefreshOutcome = 'applied' | 'unchanged' | 'rejected' | 'no-commit';

export interface RejectedCommit {
  commit: string;
  at: string;
  /** `file:line:col: message` lines (paths relative to the repository), or why it could not be read. */
  problems: string[];
}

export interface GitRegistryStatus {
  url: string;
  branch: string;
  appliedCommit: string | null;
  appliedAt: string | null;
  users: number;
  fetchedCommit: string | null;
  lastFetchAt: string | null;
  lastFetchError: string | null;
  rejected: RejectedCommit | null;
  /** The most pressing thing wrong now (a rejected commit, else a failing fetch), or null. */
  lastError: { message: string; at: string } | null;
}

class GitError extends Error {
  constructor(
    message: string,
    readonly stderr: string,
  ) {
    super(message);
    this.name = 'GitError';
  }
}

/** Last meaningful line of git's stderr, for one-line reports. */
function gitReason(stderr: string): string {
  const lines = stderr
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);
  return lines.find((l) => l.startsWith('fatal:')) ?? lines[lines.length - 1] ?? 'failed';
}

/**
 * Follows a git repository holding a registry. Events: `change` (registry, previous, commit), `rejected`
 * (RejectedCommit), `fetch-failed` (message). Never `error`.
 */
export class GitRegistrySource extends EventEmitter implements RegistryProvider {
  private current: Registry;
  private readonly repo: string;
  private readonly branch: string;
  private readonly intervalMs: number;
  private timer: NodeJS.Timeout | undefined;
  private chain: Promise<unknown> = Promise.resolve();
  private readonly children = new Set<ChildProcess>();
  private closed = false;
  private appliedCommit: string | null = null;
  private appliedAt: Date | null = null;
  private fetchedCommit: string | null = null;
  private lastFetchAt: Date | null = null;
  private lastFetchError: { message: string; at: Date } | null = null;
  private rejected: RejectedCommit | null = null;

  constructor(private readonly opts: GitRegistryOptions) {
    super();
    this.repo = join(opts.dir, 'repo.git');
    this.branch = opts.branch ?? 'main';
    this.intervalMs = opts.intervalMs ?? (opts.intervalSeconds ?? 300) * 1000;
    this.current = emptyRegistry(join(opts.dir, 'current'));
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

  /**
   * Set up the clone, apply the last applied commit from it (so the box serves even offline), then fetch. Never
   * throws for git or network trouble: that is reported in `status()`.
   */
  async start(): Promise<Registry> {
    await mkdir(this.opts.dir, { recursive: true });
    let fresh = false;
    try {
      await stat(join(this.repo, 'HEAD'));
    } catch {
      await rm(this.repo, { recursive: true, force: true });
      await this.git(['init', '--bare', '--quiet', this.repo], { cwd: this.opts.dir, noRepo: true });
      fresh = true;
    }
    if (!fresh) {
      const applied = await this.revParse('refs/buildbox/applied');
      if (applied) await this.serialize(() => this.tryApply(applied, 'restart'));
    }
    await this.refresh();
    if (this.intervalMs > 0 && !this.closed) {
      this.timer = setInterval(() => void this.refresh(), this.intervalMs);
      this.timer.unref();
    }
    return this.current;
  }

  /** Fetch now and apply the tip if it is new and passes the check. Calls are queued, never run at once. */
  refresh(): Promise<RefreshOutcome> {
    return this.serialize(async () => {
      await this.fetch();
      const tip = await this.revParse('refs/buildbox/fetched');
      this.fetchedCommit = tip;
      if (!tip) return 'no-commit';
      if (tip === this.appliedCommit) return 'unchanged';
      if (tip === this.rejected?.commit) return 'rejected';
      return this.tryApply(tip, 'fetch');
    });
  }

  /** Same as refresh (the name the box's reload path uses). */
  reload(): Promise<RefreshOutcome> {
    return this.refresh();
  }

  status(): GitRegistryStatus {
    const lastError = this.rejected
      ? {
          message: `commit ${this.rejected.commit.slice(0, 12)} rejected: ${this.rejected.problems[0] ?? 'check failed'}${
            this.rejected.problems.length > 1 ? ` (and ${this.rejected.problems.length - 1} more)` : ''
          }`,
          at: this.rejected.at,
        }
      : this.lastFetchError
        ? { message: `fetch failed: ${this.lastFetchError.message}`, at: this.lastFetchError.at.toISOString() }
        : null;
    return {
      url: this.opts.url,
      branch: this.branch,
      appliedCommit: this.appliedCommit,
      appliedAt: this.appliedAt?.toISOString() ?? null,
      users: this.current.users.size,
      fetchedCommit: this.fetchedCommit,
      lastFetchAt: this.lastFetchAt?.toISOString() ?? null,
      lastFetchError: this.lastFetchError?.message ?? null,
      rejected: this.rejected,
      lastError,
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    for (const c of this.children) c.kill('SIGKILL');
    await this.chain.catch(() => {});
    this.removeAllListeners();
  }

  private serialize<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(
      () => (this.closed ? (Promise.resolve('unchanged') as Promise<T>) : fn()),
      () => (this.closed ? (Promise.resolve('unchanged') as Promise<T>) : fn()),
    );
    this.chain = run.catch(() => {});
    return run;
  }

  private async fetch(): Promise<void> {
    const log = this.opts.logger;
    this.lastFetchAt = new Date();
    try {
      await this.git(
        ['fetch', '--quiet', '--no-tags', '--', this.opts.url, `+refs/heads/${this.branch}:refs/buildbox/fetched`],
        { timeoutMs: this.opts.fetchTimeoutMs ?? 120_000 },
      );
      this.lastFetchError = null;
    } catch (e) {
      if (this.closed) return;
      const message = e instanceof GitError ? gitReason(e.stderr) || e.message : (e as Error).message;
      this.lastFetchError = { message, at: new Date() };
      log?.warn(
        { url: this.opts.url, branch: this.branch, err: message },
        'registry fetch failed; keeping the registry we have',
      );
      this.emit('fetch-failed', message);
    }
  }

  /** Check out `commit`, check it, and apply it if it passes. */
  private async tryApply(commit: string, why: 'fetch' | 'restart'): Promise<RefreshOutcome> {
    const log = this.opts.logger;
    const work = join(this.opts.dir, `work-${commit.slice(0, 12)}-${randomBytes(3).toString('hex')}`);
    try {
      await this.checkout(commit, work);
      const result = await checkRegistry(work, {
        usersFile: this.opts.usersFile,
        strict: this.opts.strict,
        requireVouch: this.opts.requireVouch,
      });
      if (result.exitCode !== 0) {
        const problems =
          result.exitCode === 2
            ? [result.readError!.replaceAll(`${work}/`, '')]
            : result.problems.filter((p) => p.severity === 'error').map((p) => formatProblem(p, work));
        this.rejected = { commit, at: new Date().toISOString(), problems };
        log?.error(
          { commit, problems },
          `registry commit ${commit.slice(0, 12)} fails users check; keeping the last good registry`,
        );
        this.emit('rejected', this.rejected);
        return 'rejected';
      }
      const current = join(this.opts.dir, 'current');
      await rm(current, { recursive: true, force: true });
      await rename(work, current);
      const next = await loadRegistry(current, { usersFile: this.opts.usersFile });
      next.source = `git ${commit}`;
      const previous = this.current;
      this.current = next;
      this.appliedCommit = commit;
      this.appliedAt = new Date();
      this.rejected = null;
      await this.git(['update-ref', 'refs/buildbox/applied', commit]);
      log?.info({ commit, users: next.users.size, why }, 'registry commit applied');
      this.emit('change', next, previous, commit);
      return 'applied';
    } catch (e) {
      if (this.closed) return 'unchanged';
      const message = e instanceof GitError ? gitReason(e.stderr) : (e as Error).message;
      this.rejected = { commit, at: new Date().toISOString(), problems: [`cannot check out the commit: ${message}`] };
      log?.error({ commit, err: message }, 'registry commit could not be checked out');
      this.emit('rejected', this.rejected);
      return 'rejected';
    } finally {
      await rm(work, { recursive: true, force: true }).catch(() => {});
    }
  }

  /** Materialise a commit's tree in `work` (a private index; the bare repository is never touched). */
  private async checkout(commit: string, work: string): Promise<void> {
    await mkdir(work, { recursive: true });
    const index = `${work}.index`;
    const env = { GIT_INDEX_FILE: index };
    try {
      await this.git(['read-tree', commit], { env });
      await this.git(['--work-tree', work, 'checkout-index', '--all', '--force'], { env });
    } finally {
      await rm(index, { force: true });
    }
  }

  private async revParse(ref: string): Promise<string | null> {
    try {
      const out = await this.git(['rev-parse', '--verify', '--quiet', `${ref}^{commit}`]);
      const s = out.trim();
      return /^[0-9a-f]{40,64}$/.test(s) ? s : null;
    } catch {
      return null;
    }
  }

  private git(
    args: string[],
    o: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number; noRepo?: boolean } = {},
  ): Promise<string> {
    const full = o.noRepo ? args : ['--git-dir', this.repo, '-c', 'core.hooksPath=/dev/null', ...args];
    return new Promise((resolve, reject) => {
      const child = spawn(this.opts.git ?? 'git', full, {
        cwd: o.cwd ?? this.opts.dir,
        env: {
          ...process.env,
          GIT_TERMINAL_PROMPT: '0',
          GIT_SSH_COMMAND: process.env.GIT_SSH_COMMAND ?? 'ssh -o BatchMode=yes',
          LC_ALL: 'C',
          ...o.env,
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      this.children.add(child);
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      child.stdout.on('data', (d: Buffer) => out.push(d));
      child.stderr.on('data', (d: Buffer) => err.push(d));
      const timer = o.timeoutMs
        ? setTimeout(() => {
            err.push(Buffer.from(`fatal: git ${args[0]} timed out after ${o.timeoutMs} ms\n`));
            child.kill('SIGKILL');
          }, o.timeoutMs)
        : undefined;
      child.on('error', (e) => {
        if (timer) clearTimeout(timer);
        this.children.delete(child);
        reject(new GitError(`cannot run git: ${e.message}`, e.message));
      });
      child.on('close', (code, signal) => {
        if (timer) clearTimeout(timer);
        this.children.delete(child);
        const stderr = Buffer.concat(err).toString();
        if (code === 0) resolve(Buffer.concat(out).toString());
        else reject(new GitError(`git ${args[0]} failed (${code ?? signal})`, stderr));
      });
    });
  }
}
