/**
 * Reading a V8 `.cpuprofile` (from `node --cpu-prof`): where the busy time went, by function (self and inclusive) and
 * by file or package, as shares of the non-idle time.
 */
import { readFileSync } from 'node:fs';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

export interface ProfileEntry {
  name: string;
  ms: number;
  share: number;
}

export interface ProfileSummary {
  file: string;
  totalMs: number;
  busyMs: number;
  self: ProfileEntry[];
  inclusive: ProfileEntry[];
  byFile: ProfileEntry[];
  /** Self time charged to the nearest frame of buildbox or a package ("owner ← native/internal callee"). */
  owners: ProfileEntry[];
}

function shortUrl(url: string, repo: string): string {
  let u = url.replace(/^file:\/\//, '');
  if (u.startsWith(`${repo}/`)) u = u.slice(repo.length + 1);
  const nm = u.lastIndexOf('node_modules/');
  if (nm >= 0) u = u.slice(nm);
  return u;
}

/** File or package a frame belongs to. */
function groupOf(url: string, repo: string): string {
  const u = shortUrl(url, repo);
  if (u === '') return '(native / V8)';
  if (u.startsWith('node:')) return 'node: internals';
  const m = /^node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(u);
  if (m) return `node_modules/${m[1]}`;
  return u.replace(/^dist\//, '').replace(/\.js$/, '.ts');
}

export function analyzeProfile(file: string, repo: string, top = 25): ProfileSummary {
  const p = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile;
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const n of p.nodes) {
    byId.set(n.id, n);
    for (const c of n.children ?? []) parent.set(c, n.id);
  }
  const keyOf = (n: ProfileNode) => {
    const f = n.callFrame;
    if (f.url === '') return f.functionName || '(anonymous native)';
    const where = shortUrl(f.url, repo)
      .replace(/^dist\//, '')
      .replace(/\.js$/, '.ts');
    return `${where}:${f.functionName || '(anonymous)'} (js line ${f.lineNumber + 1})`;
  };
  const idle = new Set(['(idle)']);
  const self = new Map<string, number>();
  const incl = new Map<string, number>();
  const files = new Map<string, number>();
  const owners = new Map<string, number>();
  const isOwner = (n: ProfileNode) => {
    const u = shortUrl(n.callFrame.url, repo);
    return u.startsWith('dist/src/') || u.startsWith('node_modules/');
  };
  let total = 0;
  let busy = 0;
  const avg = p.samples.length > 0 ? (p.endTime - p.startTime) / p.samples.length : 0;
  for (let i = 0; i < p.samples.length; i++) {
    const dt = (p.timeDeltas[i + 1] ?? avg) / 1000;
    const node = byId.get(p.samples[i]!);
    if (!node) continue;
    total += dt;
    const k = keyOf(node);
    if (idle.has(k)) continue;
    busy += dt;
    self.set(k, (self.get(k) ?? 0) + dt);
    const g =
      node.callFrame.url === '' && node.callFrame.functionName.startsWith('(')
        ? node.callFrame.functionName
        : groupOf(node.callFrame.url, repo);
    files.set(g, (files.get(g) ?? 0) + dt);
    let owner: ProfileNode | undefined = node;
    while (owner && !isOwner(owner)) owner = byId.get(parent.get(owner.id) ?? -1);
    const ok = owner ? keyOf(owner) : '(no buildbox or package frame)';
    const ownerKey = owner === node ? ok : `${ok} ← ${k.replace(/ \(js line \d+\)$/, '')}`;
    owners.set(ownerKey, (owners.get(ownerKey) ?? 0) + dt);
    const seen = new Set<string>();
    for (let id: number | undefined = node.id; id !== undefined; id = parent.get(id)) {
      const n = byId.get(id)!;
      const key = keyOf(n);
      if (key === '(root)' || seen.has(key)) continue;
      seen.add(key);
      incl.set(key, (incl.get(key) ?? 0) + dt);
    }
  }
  const list = (m: Map<string, number>, n: number, filter: (k: string) => boolean = () => true) =>
    [...m.entries()]
      .filter(([k]) => filter(k))
      .sort((a, b) => b[1] - a[1])
      .slice(0, n)
      .map(([name, ms]) => ({ name, ms: Math.round(ms), share: busy ? ms / busy : 0 }));
  return {
    file,
    totalMs: Math.round(total),
    busyMs: Math.round(busy),
    self: list(self, top),
    inclusive: list(incl, top, (k) => k.startsWith('src/')),
    byFile: list(files, top),
    owners: list(owners, top),
  };
}

export function formatProfile(s: ProfileSummary): string {
  const pct = (x: number) => `${(x * 100).toFixed(1).padStart(5)}%`;
  const section = (title: string, es: ProfileEntry[]) =>
    `${title}\n${es.map((e) => `  ${pct(e.share)} ${String(e.ms).padStart(7)} ms  ${e.name}`).join('\n')}`;
  return [
    `CPU profile of buildbox (${s.file}): ${s.busyMs} ms busy of ${s.totalMs} ms (shares are of the busy time)`,
    section('self time by file / package:', s.byFile),
    section('self time by function:', s.self),
    section('self time charged to the nearest buildbox / package function (← what it spent it in):', s.owners),
    section('inclusive time, buildbox functions:', s.inclusive),
  ].join('\n\n');
}
