/** Structured logs (pino): JSON lines on stdout for the box, quiet in tests unless BUILDBOX_LOG_LEVEL says otherwise. */
import { type Logger, pino } from 'pino';

export type { Logger };

export function createLogger(level = process.env.BUILDBOX_LOG_LEVEL ?? 'info', destination: number = 1): Logger {
  return pino({ level, base: { app: 'buildbox' } }, pino.destination({ dest: destination, sync: false }));
}

export function silentLogger(): Logger {
  return pino({ level: process.env.BUILDBOX_LOG_LEVEL ?? 'silent' }, pino.destination({ dest: 2, sync: true }));
}
