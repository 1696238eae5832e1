/**
 * Operated in the open: an HTTP status page, a JSON API (`/api/status`) and Prometheus metrics (`/metrics`).
 * Read-only, no user data beyond user names and counts.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Box } from './box.js';
import { systemsOf } from './config.js';
import { VERSION } from './version.js';

export interface StatusServerHandle {
  port: number;
  close(): Promise<void>;
}

export function statusSnapshot(box: Box) {
  const sched = box.scheduler.stats();
  return {
    version: VERSION,
    uptimeSeconds: Math.round((Date.now() - box.startedAt) / 1000),
    hostKey: { fingerprint: box.hostKey.fingerprint, publicKey: box.hostKey.publicKey },
    signingKey: box.signingKey.publicKey.toString(),
    systems: systemsOf(box.config),
    supportedFeatures: box.config.supportedFeatures,
    mandatoryFeatures: box.config.mandatoryFeatures,
    maxJobs: box.config.maxJobs,
    connections: box.ssh.connections(),
    builds: { running: sched.running, busy: sched.busy, queue: sched.queue },
    store: box.store.stats(),
    registry: box.registry.status(),
  };
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function renderPage(box: Box): string {
  const s = statusSnapshot(box);
  const rows = (obj: Record<string, unknown>) =>
    Object.entries(obj)
      .map(
        ([k, v]) =>
          `<tr><th>${escapeHtml(k)}</th><td>${escapeHtml(typeof v === 'string' ? v : JSON.stringify(v))}</td></tr>`,
      )
      .join('');
  return `<!doctype html><html><head><meta charset="utf-8"><title>buildbox</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}th{text-align:left;padding-right:1em}code{word-break:break-all}</style>
</head><body><h1>buildbox ${escapeHtml(s.version)}</h1>
<p>Host key <code>${escapeHtml(s.hostKey.fingerprint)}</code>, signing key <code>${escapeHtml(s.signingKey)}</code></p>
<table>${rows({
    uptime: `${s.uptimeSeconds}s`,
    systems: s.systems.join(' '),
    features: s.supportedFeatures.join(' '),
    'build slots': `${s.builds.busy} / ${s.maxJobs} busy`,
    queue: `${s.builds.queue.length} waiting`,
    connections: s.connections,
  })}</table>
<h2>Running builds per user</h2><table>${rows(s.builds.running)}</table>
<h2>Store</h2><table>${rows(s.store as unknown as Record<string, unknown>)}</table>
<h2>Registry</h2><table>${rows(s.registry as unknown as Record<string, unknown>)}</table>
<p><a href="/api/status">JSON</a> · <a href="/metrics">metrics</a></p></body></html>`;
}

function renderMetrics(box: Box): string {
  const s = statusSnapshot(box);
  const lines: string[] = [];
  const metric = (name: string, help: string, type: string, values: Array<[Record<string, string>, number]>) => {
    lines.push(`# HELP buildbox_${name} ${help}`, `# TYPE buildbox_${name} ${type}`);
    for (const [labels, v] of values) {
      const l = Object.entries(labels)
        .map(([k, x]) => `${k}="${x.replace(/["\\\n]/g, '_')}"`)
        .join(',');
      lines.push(`buildbox_${name}${l ? `{${l}}` : ''} ${v}`);
    }
  };
  metric('uptime_seconds', 'Seconds since the box started.', 'gauge', [[{}, s.uptimeSeconds]]);
  metric('build_slots', 'Configured build slots.', 'gauge', [[{}, s.maxJobs]]);
  metric('build_slots_busy', 'Build slots in use.', 'gauge', [[{}, s.builds.busy]]);
  metric('builds_waiting', 'Builds waiting for a slot.', 'gauge', [[{}, s.builds.queue.length]]);
  metric(
    'builds_running',
    'Running builds per user.',
    'gauge',
    Object.entries(s.builds.running).map(([user, n]) => [{ user }, n]),
  );
  metric('ssh_connections', 'Open SSH connections.', 'gauge', [[{}, s.connections]]);
  for (const [k, v] of Object.entries(s.store as unknown as Record<string, unknown>)) {
    if (typeof v === 'number')
      metric(`store_${k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}`, `Store ${k}.`, 'gauge', [[{}, v]]);
  }
  return `${lines.join('\n')}\n`;
}

export async function startStatusServer(box: Box, listen: string, port: number): Promise<StatusServerHandle> {
  const server: Server = createServer((req, res) => {
    try {
      const url = new URL(req.url ?? '/', 'http://x');
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { allow: 'GET, HEAD' }).end('method not allowed\n');
      } else if (url.pathname === '/') {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(renderPage(box));
      } else if (url.pathname === '/api/status') {
        res
          .writeHead(200, { 'content-type': 'application/json' })
          .end(`${JSON.stringify(statusSnapshot(box), null, 2)}\n`);
      } else if (url.pathname === '/metrics') {
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(renderMetrics(box));
      } else {
        res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
      }
    } catch (e) {
      box.logger.error({ err: (e as Error).message }, 'status page failed');
      if (!res.headersSent) res.writeHead(500).end('internal error\n');
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, listen, () => resolve());
  });
  return {
    port: (server.address() as AddressInfo).port,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}
