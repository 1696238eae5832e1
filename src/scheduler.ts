/**
 * Global build slots shared fairly between users.
 *
 * - `maxJobs` slots; slot `i` runs its builds as its own unprivileged uid `uidBase + i` (gid: the configured one, or
 *   the same number as the uid), so builds never share a uid and a sandbox escape gains nothing.
 * - Fair share: when a slot frees, it goes to the waiting user with the fewest running builds; ties go to the user
 *   whose oldest waiting build has waited longest. Within one user, builds are served in the order they queued.
 * - Per-user limit (`jobs` in the registry, `userLimit(user)`; `undefined` = unlimited): a user at the limit waits even
 *   when slots are free, and does not block others.
 * - Queue positions: "ahead" of a waiting build = the number of waiting builds that the current fair-share order would
 *   serve before it. The order is exactly what the dispatcher would do if no running build finished: repeatedly serve
 *   the user with the fewest (running + already served) builds, ties by waiting time. Builds of a user who has reached
 *   their limit come after all others (they can only start when one of that user's own builds ends).
 */

export interface Slot {
  /** 0 ≤ index < maxJobs. */
  readonly index: number;
  /** Host uid the build runs as (outside the sandbox). */
  readonly uid: number;
  /** Host gid the build runs as. */
  readonly gid: number;
  /** Give the slot back. Idempotent. */
  release(): void;
}

export interface SchedulerOptions {
  maxJobs: number;
  /** First build uid; slot i uses uidBase + i. Default 30000. */
  uidBase?: number;
  /** Group of every build; default: each slot its own gid, equal to its uid. */
  gid?: number;
  /** Per-user job limit from the registry; undefined = unlimited. Read again at every scheduling decision. */
  userLimit?: (user: string) => number | undefined;
}

export interface AcquireOptions {
  signal?: AbortSignal;
  /** Called when the build is queued and whenever the number of builds ahead of it changes. */
  onPosition?: (ahead: number) => void;
}

export interface SchedulerStats {
  maxJobs: number;
  /** Slots in use. */
  busy: number;
  /** Running builds per user (users with none are absent). */
  running: Record<string, number>;
  /** Waiting builds in the order they would be served, with how long each has waited. */
  queue: Array<{ user: string; ahead: number; waitingMs: number }>;
}

/** Thrown (as the rejection of `acquire`) when a waiting build is cancelled through its signal. */
export class SchedulerAbortError extends Error {
  constructor(message = 'the build was cancelled while waiting for a build slot') {
    super(message);
    this.name = 'AbortError';
  }
}

export class SchedulerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SchedulerError';
  }
}

interface Waiter {
  user: string;
  seq: number;
  since: number;
  resolve(slot: Slot): void;
  reject(err: unknown): void;
  onPosition: ((ahead: number) => void) | undefined;
  lastAhead: number;
  cleanup(): void;
}

export class Scheduler {
  readonly maxJobs: number;
  readonly uidBase: number;
  private readonly gid: number | undefined;
  private readonly userLimit: (user: string) => number | undefined;
  private readonly freeSlots: number[] = [];
  private readonly running = new Map<string, number>();
  /** Per user, their waiting builds in queue order. Users with no waiter are absent. */
  private readonly waiting = new Map<string, Waiter[]>();
  private seq = 0;

  constructor(opts: SchedulerOptions) {
    if (!Number.isInteger(opts.maxJobs) || opts.maxJobs < 1) {
      throw new SchedulerError(`max-jobs must be a positive integer, got ${opts.maxJobs}`);
    }
    this.maxJobs = opts.maxJobs;
    this.uidBase = opts.uidBase ?? 30000;
    this.gid = opts.gid;
    this.userLimit = opts.userLimit ?? (() => undefined);
    for (let i = 0; i < this.maxJobs; i++) this.freeSlots.push(i);
  }

  /**
   * Wait for a build slot for `user`. Resolves with the slot (release it when the build is over); rejects with an
   * `AbortError` if `signal` fires first (the build then no longer counts in anybody's position).
   */
  acquire(user: string, opts: AcquireOptions = {}): Promise<Slot> {
    const { signal, onPosition } = opts;
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    const limit = this.limitOf(user);
    if (limit === 0) {
      return Promise.reject(
        new SchedulerError(`user '${user}' may not run builds on this box (jobs = 0 in the users registry)`),
      );
    }
    return new Promise<Slot>((resolve, reject) => {
      const onAbort = (): void => {
        if (!this.removeWaiter(waiter)) return;
        reject(abortReason(signal!));
        this.dispatch();
      };
      const waiter: Waiter = {
        user,
        seq: this.seq++,
        since: Date.now(),
        resolve,
        reject,
        onPosition,
        lastAhead: -1,
        cleanup: () => signal?.removeEventListener('abort', onAbort),
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      let list = this.waiting.get(user);
      if (!list) this.waiting.set(user, (list = []));
      list.push(waiter);
      this.dispatch();
    });
  }

  /** Running builds per user and the queue, for the status page. */
  stats(): SchedulerStats {
    const now = Date.now();
    const running: Record<string, number> = {};
    let busy = 0;
    for (const [u, n] of this.running) {
      running[u] = n;
      busy += n;
    }
    const queue = this.serviceOrder().map((w, i) => ({ user: w.user, ahead: i, waitingMs: now - w.since }));
    return { maxJobs: this.maxJobs, busy, running, queue };
  }

  /** Number of builds `user` is running now. */
  runningFor(user: string): number {
    return this.running.get(user) ?? 0;
  }

  /** Number of waiting builds. */
  get queued(): number {
    let n = 0;
    for (const l of this.waiting.values()) n += l.length;
    return n;
  }

  private limitOf(user: string): number {
    const l = this.userLimit(user);
    if (l === undefined || !Number.isFinite(l)) return Number.POSITIVE_INFINITY;
    return Math.max(0, Math.floor(l));
  }

  private removeWaiter(w: Waiter): boolean {
    const list = this.waiting.get(w.user);
    if (!list) return false;
    const i = list.indexOf(w);
    if (i < 0) return false;
    list.splice(i, 1);
    if (list.length === 0) this.waiting.delete(w.user);
    w.cleanup();
    return true;
  }

  /**
   * All waiting builds in the order they would be served. Each user's k-th waiting build gets the key
   * (deferred, running + k, seq): fewest builds first, then longest waiting; deferred = the user would be over their
   * limit. Since each user's keys increase, sorting is the same as repeatedly picking the best head of queue.
   */
  private serviceOrder(): Waiter[] {
    const keyed: Array<{ w: Waiter; deferred: number; load: number }> = [];
    for (const [user, list] of this.waiting) {
      const run = this.runningFor(user);
      const limit = this.limitOf(user);
      list.forEach((w, k) => {
        keyed.push({ w, deferred: run + k >= limit ? 1 : 0, load: run + k });
      });
    }
    keyed.sort((a, b) => a.deferred - b.deferred || a.load - b.load || a.w.seq - b.w.seq);
    return keyed.map((k) => k.w);
  }

  /** Hand free slots to the best eligible waiters, then tell every waiter whose position changed. */
  private dispatch(): void {
    while (this.freeSlots.length > 0) {
      let best: Waiter | undefined;
      let bestLoad = 0;
      for (const [user, list] of this.waiting) {
        const run = this.runningFor(user);
        if (run >= this.limitOf(user)) continue;
        const head = list[0]!;
        if (!best || run < bestLoad || (run === bestLoad && head.seq < best.seq)) {
          best = head;
          bestLoad = run;
        }
      }
      if (!best) break;
      this.removeWaiter(best);
      const index = this.freeSlots.shift()!;
      this.running.set(best.user, this.runningFor(best.user) + 1);
      best.resolve(this.makeSlot(index, best.user));
    }
    this.notifyPositions();
  }

  private notifyPositions(): void {
    const order = this.serviceOrder();
    order.forEach((w, ahead) => {
      if (w.lastAhead === ahead) return;
      w.lastAhead = ahead;
      if (!w.onPosition) return;
      try {
        w.onPosition(ahead);
      } catch {
        // A broken listener must not break scheduling for everybody else.
      }
    });
  }

  private makeSlot(index: number, user: string): Slot {
    let released = false;
    const uid = this.uidBase + index;
    return {
      index,
      uid,
      gid: this.gid ?? uid,
      release: () => {
        if (released) return;
        released = true;
        const n = this.runningFor(user) - 1;
        if (n > 0) this.running.set(user, n);
        else this.running.delete(user);
        this.freeSlots.push(index);
        this.freeSlots.sort((a, b) => a - b);
        this.dispatch();
      },
    };
  }
}

function abortReason(signal: AbortSignal): Error {
  const r: unknown = signal.reason;
  if (r instanceof Error && r.name !== 'AbortError') return r;
  return new SchedulerAbortError();
}
