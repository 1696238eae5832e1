/** Results: samples per metric and target, medians and ranges, ratios, the issue's targets, the table and the JSON. */

export type TargetName = 'buildbox' | 'reference';
export const TARGETS: TargetName[] = ['buildbox', 'reference'];

export interface Sample {
  rep: number;
  value: number | null;
  error?: string;
  extra?: Record<string, unknown>;
}

export interface Summary {
  n: number;
  errors: number;
  median: number | null;
  min: number | null;
  max: number | null;
}

export interface Verdict {
  ok: boolean;
  why: string;
}

export interface Metric {
  id: string;
  workload: string;
  proto: string;
  label: string;
  unit: string;
  better: 'higher' | 'lower';
  samples: Record<TargetName, Sample[]>;
  /** The issue's target for this metric, judged on the summaries (buildbox, reference). */
  goal?: { text: string; check(bb: Summary, ref: Summary): Verdict | null };
}

export function median(xs: number[]): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Nearest-rank percentile (p in 0..100). */
export function percentile(xs: number[], p: number): number | null {
  if (xs.length === 0) return null;
  const s = [...xs].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * s.length));
  return s[rank - 1]!;
}

export function summarize(samples: Sample[]): Summary {
  const vals = samples.map((s) => s.value).filter((v): v is number => v !== null && Number.isFinite(v));
  return {
    n: vals.length,
    errors: samples.filter((s) => s.error !== undefined).length,
    median: median(vals),
    min: vals.length ? Math.min(...vals) : null,
    max: vals.length ? Math.max(...vals) : null,
  };
}

export function ratio(bb: Summary, ref: Summary): number | null {
  if (bb.median === null || ref.median === null || ref.median === 0) return null;
  return bb.median / ref.median;
}

export class Results {
  readonly metrics: Metric[] = [];

  metric(id: string, init: Omit<Metric, 'id' | 'samples'> & { samples?: Record<TargetName, Sample[]> }): Metric {
    let m = this.metrics.find((x) => x.id === id);
    if (!m) {
      m = { id, samples: { buildbox: [], reference: [] }, ...init };
      this.metrics.push(m);
    }
    return m;
  }

  get(id: string): Metric | undefined {
    return this.metrics.find((x) => x.id === id);
  }
}

function fmt(v: number | null, unit: string): string {
  if (v === null) return '—';
  if (unit === 'count') return String(Math.round(v));
  const a = Math.abs(v);
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toFixed(3);
}

function cell(s: Summary, unit: string, total: number): string {
  if (total === 0) return 'not run';
  if (s.median === null) return `failed (${s.errors}/${total})`;
  const range = s.n > 1 ? ` (${fmt(s.min, unit)}–${fmt(s.max, unit)})` : '';
  const errs = s.errors > 0 ? ` [${s.errors} err]` : '';
  return `${fmt(s.median, unit)}${range}${errs}`;
}

export interface Row {
  workload: string;
  proto: string;
  metric: string;
  buildbox: string;
  reference: string;
  ratio: string;
  goal: string;
  verdict: string;
}

export function rows(results: Results): Row[] {
  return results.metrics.map((m) => {
    const bb = summarize(m.samples.buildbox);
    const ref = summarize(m.samples.reference);
    const r = ratio(bb, ref);
    const v = m.goal ? m.goal.check(bb, ref) : null;
    return {
      workload: m.workload,
      proto: m.proto,
      metric: `${m.label} [${m.unit}]`,
      buildbox: cell(bb, m.unit, m.samples.buildbox.length),
      reference: cell(ref, m.unit, m.samples.reference.length),
      ratio: r === null ? '—' : `${r.toFixed(2)}×`,
      goal: m.goal?.text ?? '',
      verdict: v === null ? '' : v.ok ? 'meets' : `MISSES (${v.why})`,
    };
  });
}

const HEADERS: Record<keyof Row, string> = {
  workload: 'workload',
  proto: 'proto',
  metric: 'metric',
  buildbox: 'buildbox median (min–max)',
  reference: 'reference median (min–max)',
  ratio: 'bb/ref',
  goal: 'target',
  verdict: 'verdict',
};

/** Fixed-width table for the terminal. */
export function textTable(rs: Row[]): string {
  const keys = Object.keys(HEADERS) as Array<keyof Row>;
  const width = (k: keyof Row) => Math.max(HEADERS[k].length, ...rs.map((r) => r[k].length));
  const line = (r: Record<keyof Row, string>) =>
    keys
      .map((k) => r[k].padEnd(width(k)))
      .join('  ')
      .trimEnd();
  return [line(HEADERS), keys.map((k) => '-'.repeat(width(k))).join('  '), ...rs.map(line)].join('\n');
}

/** The same table in Markdown (for the README). */
export function markdownTable(rs: Row[]): string {
  const keys = Object.keys(HEADERS) as Array<keyof Row>;
  const esc = (s: string) => s.replace(/\|/g, '\\|');
  return [
    `| ${keys.map((k) => HEADERS[k]).join(' | ')} |`,
    `|${keys.map(() => '---').join('|')}|`,
    ...rs.map((r) => `| ${keys.map((k) => esc(r[k])).join(' | ')} |`),
  ].join('\n');
}

/** The issue's targets, as checks on medians. */
export const goals = {
  atLeastRef: (extra?: { min: number; unit: string }) => ({
    text: `≥ 1.0× ref${extra ? `, ≥ ${extra.min} ${extra.unit}` : ''}`,
    check(bb: Summary, ref: Summary): Verdict | null {
      const r = ratio(bb, ref);
      if (r === null) return null;
      if (r < 1) return { ok: false, why: `${r.toFixed(2)}× ref` };
      if (extra && bb.median! < extra.min) return { ok: false, why: `${bb.median!.toFixed(0)} < ${extra.min}` };
      return { ok: true, why: '' };
    },
  }),
  atMostRef: (factor: number) => ({
    text: `≤ ${factor.toFixed(1)}× ref`,
    check(bb: Summary, ref: Summary): Verdict | null {
      const r = ratio(bb, ref);
      if (r === null) return null;
      return r <= factor ? { ok: true, why: '' } : { ok: false, why: `${r.toFixed(2)}× ref` };
    },
  }),
  below: (limit: number, unit: string) => ({
    text: `< ${limit} ${unit}`,
    check(bb: Summary): Verdict | null {
      if (bb.median === null) return null;
      const worst = bb.max ?? bb.median;
      return worst < limit ? { ok: true, why: '' } : { ok: false, why: `${worst.toFixed(0)} ${unit}` };
    },
  }),
  atMost: (limit: number, unit: string) => ({
    text: `≤ ${limit}${unit === 'count' ? '' : ` ${unit}`}`,
    check(bb: Summary): Verdict | null {
      if (bb.median === null) return null;
      const worst = bb.max ?? bb.median;
      return worst <= limit ? { ok: true, why: '' } : { ok: false, why: `${worst}` };
    },
  }),
};
