/** Operated in the open: the status page, JSON API and Prometheus metrics of a running box. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startTestBox, type TestBox } from './helpers/box.js';

let tb: TestBox;
beforeAll(async () => {
  tb = await startTestBox({ users: ['alice'] });
});
afterAll(async () => {
  await tb?.stop();
});

const get = async (path: string, method = 'GET') => {
  const res = await fetch(`http://127.0.0.1:${tb.box.status!.port}${path}`, { method });
  return { status: res.status, type: res.headers.get('content-type'), body: await res.text() };
};

describe('status server', () => {
  it('serves a JSON status with the host key, slots and registry', async () => {
    const r = await get('/api/status');
    expect(r.status).toBe(200);
    expect(r.type).toBe('application/json');
    const j = JSON.parse(r.body);
    expect(j.hostKey.fingerprint).toBe(tb.box.hostKey.fingerprint);
    expect(j.signingKey).toBe(tb.box.signingKey.publicKey.toString());
    expect(j.maxJobs).toBe(4);
    expect(j.builds).toEqual({ running: {}, busy: 0, queue: [] });
    expect(j.registry.users).toBe(1);
    expect(j.registry.lastError).toBeNull();
    expect(typeof j.store.objects).toBe('number');
  });

  it('serves Prometheus metrics and an HTML page that escapes what it shows', async () => {
    const m = await get('/metrics');
    expect(m.status).toBe(200);
    expect(m.body).toMatch(/^# HELP buildbox_uptime_seconds /m);
    expect(m.body).toMatch(/^buildbox_build_slots 4$/m);
    expect(m.body).toMatch(/^buildbox_build_slots_busy 0$/m);
    expect(m.body).toMatch(/^buildbox_store_objects \d+$/m);
    expect(m.body).toMatch(/^buildbox_store_inline_objects \d+$/m);
    const page = await get('/');
    expect(page.type).toContain('text/html');
    expect(page.body).toContain(tb.box.hostKey.fingerprint);
    expect(page.body).not.toContain('<script');
  });

  it('answers 404 and 405 plainly', async () => {
    expect((await get('/nope')).status).toBe(404);
    expect((await get('/', 'POST')).status).toBe(405);
  });
});
