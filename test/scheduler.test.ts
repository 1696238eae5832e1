import { describe, expect, it } from 'vitest';
import { Scheduler, type Slot } from '../src/scheduler.js';

/** A queued acquire whose outcome can be inspected synchronously after a microtask flush. */
interface Pending {
  user: string;
  label: string;
  slot?: Slot;
  error?: unknown;
  positions: number[];
  ctrl: AbortController;
}

const flush = () => new Promise((r) => setImmediate(r));

function queue(s: Scheduler, user: string, label = user): Pending {
  const ctrl = new AbortController();
  const p: Pending = { user, label, positions: [], ctrl };
  s.acquire(user, { signal: ctrl.signal, onPosition: (n) => p.positions.push(n) }).then(
    (slot) => {
      p.slot = slot;
    },
    (e) => {
      p.error = e;
    },
  );
  return p;
}

function lastPos(p: Pending): number | undefined {
  return p.positions[p.positions.length - 1];
}

describe('Scheduler', () => {
  it('gives each slot its own uid and reuses freed slots', async () => {
    const s = new Scheduler({ maxJobs: 3, uidBase: 40000 });
    const a = queue(s, 'alice');
    const b = queue(s, 'alice');
    const c = queue(s, 'bob');
    await flush();
    expect([a.slot?.uid, b.slot?.uid, c.slot?.uid]).toEqual([40000, 40001, 40002]);
    expect([a.slot?.gid, b.slot?.gid, c.slot?.gid]).toEqual([40000, 40001, 40002]);
    expect(a.positions).toEqual([]); // served at once: no position notice
    const d = queue(s, 'carol');
    await flush();
    expect(d.slot).toBeUndefined();
    expect(d.positions).toEqual([0]);
    b.slot!.release();
    b.slot!.release(); // idempotent: must not free a second slot
    await flush();
    expect(d.slot?.index).toBe(1);
    expect(d.slot?.uid).toBe(40001);
    expect(s.stats().busy).toBe(3);
    const e = queue(s, 'dave');
    await flush();
    expect(e.slot).toBeUndefined();
  });

  it('uses a shared gid when one is configured', async () => {
    const s = new Scheduler({ maxJobs: 2, uidBase: 30000, gid: 30000 });
    const a = queue(s, 'alice');
    const b = queue(s, 'alice');
    await flush();
    expect([a.slot?.uid, b.slot?.uid]).toEqual([30000, 30001]);
    expect([a.slot?.gid, b.slot?.gid]).toEqual([30000, 30000]);
  });

  it('alice queues 6 with maxJobs 2, bob queues 1: bob is next', async () => {
    const s = new Scheduler({ maxJobs: 2 });
    const alice = Array.from({ length: 6 }, (_, i) => queue(s, 'alice', `a${i}`));
    await flush();
    expect(alice.map((p) => !!p.slot)).toEqual([true, true, false, false, false, false]);
    expect(alice.slice(2).map(lastPos)).toEqual([0, 1, 2, 3]);
    const bob = queue(s, 'bob');
    await flush();
    // bob has 0 running, alice 2: bob is served first, so he has nobody ahead and every alice waiter moves back.
    expect(bob.positions).toEqual([0]);
    expect(alice.slice(2).map(lastPos)).toEqual([1, 2, 3, 4]);
    alice[0]!.slot!.release();
    await flush();
    expect(bob.slot).toBeDefined();
    expect(alice[2]!.slot).toBeUndefined();
    expect(alice.slice(2).map(lastPos)).toEqual([0, 1, 2, 3]);
    // Next free slot: alice (1 running) vs nobody else waiting → alice.
    bob.slot!.release();
    await flush();
    expect(alice[2]!.slot).toBeDefined();
    expect(alice.slice(3).map(lastPos)).toEqual([0, 1, 2]);
    expect(s.stats().running).toEqual({ alice: 2 });
  });

  it('serves the user with the fewest running builds, ties by longest waiting', async () => {
    const s = new Scheduler({ maxJobs: 3 });
    const a1 = queue(s, 'alice');
    const a2 = queue(s, 'alice');
    queue(s, 'bob');
    await flush();
    // running: alice 2, bob 1. Now carol and dave queue (0 running each), then bob again, then alice again.
    const c1 = queue(s, 'carol');
    const b2 = queue(s, 'bob');
    const d1 = queue(s, 'dave');
    const a3 = queue(s, 'alice');
    await flush();
    // Order: carol (0, seq 3), dave (0, seq 5), bob (1), alice (2).
    expect(s.stats().queue.map((q) => q.user)).toEqual(['carol', 'dave', 'bob', 'alice']);
    expect([lastPos(c1), lastPos(d1), lastPos(b2), lastPos(a3)]).toEqual([0, 1, 2, 3]);
    a1.slot!.release();
    await flush();
    expect(c1.slot).toBeDefined();
    a2.slot!.release();
    await flush();
    expect(d1.slot).toBeDefined();
    // running: alice 0, bob 1, carol 1, dave 1 → alice (0 running) beats bob although bob waited longer.
    c1.slot!.release();
    await flush();
    expect(a3.slot).toBeDefined();
    expect(b2.slot).toBeUndefined();
    expect(lastPos(b2)).toBe(0);
  });

  it('ties between users with equal running builds go to the longest waiting', async () => {
    const s = new Scheduler({ maxJobs: 1 });
    const x = queue(s, 'x');
    await flush();
    const b = queue(s, 'bob');
    const c = queue(s, 'carol');
    await flush();
    expect([lastPos(b), lastPos(c)]).toEqual([0, 1]);
    x.slot!.release();
    await flush();
    expect(b.slot).toBeDefined();
    expect(c.slot).toBeUndefined();
  });

  it('applies per-user limits without blocking others, and reads them at every decision', async () => {
    const limits: Record<string, number | undefined> = { alice: 1 };
    const s = new Scheduler({ maxJobs: 3, userLimit: (u) => limits[u] });
    const a1 = queue(s, 'alice');
    const a2 = queue(s, 'alice');
    const a3 = queue(s, 'alice');
    await flush();
    expect(a1.slot).toBeDefined();
    expect(a2.slot).toBeUndefined(); // slots are free, but alice is at her limit
    expect(s.stats().busy).toBe(1);
    const b1 = queue(s, 'bob');
    const b2 = queue(s, 'bob');
    const b3 = queue(s, 'bob');
    await flush();
    expect(b1.slot).toBeDefined();
    expect(b2.slot).toBeDefined();
    // bob's third waits for a slot; alice's deferred builds are behind him.
    expect(lastPos(b3)).toBe(0);
    expect([lastPos(a2), lastPos(a3)]).toEqual([1, 2]);
    b1.slot!.release();
    await flush();
    expect(b3.slot).toBeDefined();
    expect(a2.slot).toBeUndefined();
    a1.slot!.release();
    await flush();
    expect(a2.slot).toBeDefined();
    expect(a3.slot).toBeUndefined();
    // Raising the limit takes effect at the next decision.
    limits.alice = 5;
    b2.slot!.release();
    await flush();
    expect(a3.slot).toBeDefined();
  });

  it('refuses a user whose limit is 0', async () => {
    const s = new Scheduler({ maxJobs: 2, userLimit: () => 0 });
    await expect(s.acquire('mallory')).rejects.toThrow(/may not run builds/);
  });

  it('aborting a waiter removes it, updates positions and rejects with AbortError', async () => {
    const s = new Scheduler({ maxJobs: 1 });
    const a = queue(s, 'alice');
    const b = queue(s, 'bob');
    const c = queue(s, 'carol');
    const d = queue(s, 'dave');
    await flush();
    expect([lastPos(b), lastPos(c), lastPos(d)]).toEqual([0, 1, 2]);
    c.ctrl.abort();
    await flush();
    expect((c.error as Error).name).toBe('AbortError');
    expect(lastPos(d)).toBe(1);
    expect(d.positions).toEqual([2, 1]); // exactly one notice per change
    expect(b.positions).toEqual([0]); // unchanged: no notice
    expect(s.queued).toBe(2);
    a.slot!.release();
    await flush();
    expect(b.slot).toBeDefined();
    expect(c.slot).toBeUndefined();
    expect(d.positions).toEqual([2, 1, 0]);
  });

  it('an already-aborted signal rejects at once and aborting after acquisition does nothing', async () => {
    const s = new Scheduler({ maxJobs: 1 });
    const ctrl = new AbortController();
    ctrl.abort();
    await expect(s.acquire('alice', { signal: ctrl.signal })).rejects.toMatchObject({ name: 'AbortError' });
    const a = queue(s, 'alice');
    await flush();
    a.ctrl.abort(); // the build owns the slot now; cancelling it is the builder's business
    await flush();
    expect(s.stats().busy).toBe(1);
    a.slot!.release();
    expect(s.stats().busy).toBe(0);
  });

  it('aborting the last waiter of a user at a free slot lets the next user in', async () => {
    const s = new Scheduler({ maxJobs: 1 });
    const a = queue(s, 'alice');
    const b = queue(s, 'bob');
    const c = queue(s, 'carol');
    await flush();
    b.ctrl.abort();
    a.slot!.release();
    await flush();
    expect(c.slot).toBeDefined();
    expect(b.slot).toBeUndefined();
  });

  it('reports running builds per user and the queue in service order', async () => {
    const s = new Scheduler({ maxJobs: 2 });
    queue(s, 'alice');
    queue(s, 'alice');
    queue(s, 'alice');
    queue(s, 'bob');
    await flush();
    const st = s.stats();
    expect(st).toMatchObject({ maxJobs: 2, busy: 2, running: { alice: 2 } });
    expect(st.queue.map((q) => [q.user, q.ahead])).toEqual([
      ['bob', 0],
      ['alice', 1],
    ]);
    expect(st.queue[0]!.waitingMs).toBeGreaterThanOrEqual(0);
  });

  it('a throwing position listener does not break scheduling', async () => {
    const s = new Scheduler({ maxJobs: 1 });
    const a = queue(s, 'alice');
    let got: Slot | undefined;
    s.acquire('bob', {
      onPosition: () => {
        throw new Error('listener bug');
      },
    }).then((x) => {
      got = x;
    });
    const c = queue(s, 'carol');
    await flush();
    expect(lastPos(c)).toBe(1);
    a.slot!.release();
    await flush();
    expect(got).toBeDefined();
  });

  it('rejects a non-positive max-jobs', () => {
    expect(() => new Scheduler({ maxJobs: 0 })).toThrow(/max-jobs/);
  });
});
