/*
 * refseg's JavaScript for the FiftyOne App (fiftyone.yml: js_bundle), plain script, no build step.
 *
 * One operator, refresh_sample_views, which the plugin's Python operators trigger after writing labels.
 *
 * Why it exists (FiftyOne 1.22): the sample view (modal) gets its sample from the recoil-relay selector
 * `modalSample`, cached per (dataset, view, sample id) and fetched from the server once. The server sends it
 * as the Relay record `<sample id>-modal`, which the grid's queries never touch (their records are
 * `<sample id>`). So reload_dataset / reload_samples / set_view refresh the grid and the sidebar counts, and a
 * sample whose sample view was opened before keeps drawing the labels it had then. The cached modal sample
 * follows its Relay record, though (recoil-relay subscribes to it): the App's tagging rewrites the record's
 * `sample` field (@fiftyone/state useUpdateSamples), and so does this operator.
 *
 * For every sample the App holds a sample view record of (or only those in params.sample_ids), it asks the
 * server for the current document (the App's own `sample` GraphQL field, in the current view), writes it into
 * that record, and bumps the `refresher` atom so that the sample views' sidebar counts are fetched again
 * (FiftyOne's useRefreshSample does the same for one sample). The grid's records are left to reload_dataset,
 * which the plugin triggers first: written here too, an open sample view's looker and the grid's would be
 * handed the same document, which the second cannot send to its worker.
 */
(function () {
  "use strict";
  var PLUGIN = "@refseg/refseg";
  var MODAL_SUFFIX = "-modal";
  var CHUNK = 50; // samples per GraphQL request
  var foo = window.__foo__;
  var fos = window.__fos__;
  var fou = window.__fou__;
  if (!foo || !foo.Operator || !foo.registerOperator) {
    return; // an App without operators: nothing triggers this
  }
  // what the refresh uses; without it (another App version) the operator does nothing rather than fail
  var supported = Boolean(fos && fou && fos.getCurrentEnvironment && fos.refresher && fou.getFetchFunction);
  var TYPES = ["ImageSample", "VideoSample", "PointCloudSample", "ThreeDSample", "UnknownSample"];
  var SELECTION = "{ __typename " +
    TYPES.map(function (t) { return "... on " + t + " { id sample }"; }).join(" ") + " }";

  function cachedSampleViewIds(environment) {
    return environment.getStore().getSource().getRecordIDs()
      .filter(function (id) { return id.endsWith(MODAL_SUFFIX); })
      .map(function (id) { return id.slice(0, -MODAL_SUFFIX.length); });
  }

  async function currentDocuments(datasetName, view, ids) {
    var fetch = fou.getFetchFunction();
    var documents = [];
    for (var start = 0; start < ids.length; start += CHUNK) {
      var chunk = ids.slice(start, start + CHUNK);
      var fields = chunk.map(function (id, i) {
        var filter = "{id: " + JSON.stringify(id) + "}";
        return "s" + i + ": sample(dataset: $dataset, view: $view, filter: " + filter + ") " + SELECTION;
      });
      var query = "query refsegRefreshSampleViews($dataset: String!, $view: BSONArray!) { " + fields.join(" ") + " }";
      var response = await fetch("POST", "/graphql", { query: query, variables: { dataset: datasetName, view: view } });
      if (response && response.errors && response.errors.length) {
        throw new Error(response.errors[0].message);
      }
      var data = (response && response.data) || {};
      chunk.forEach(function (id, i) {
        var item = data["s" + i];
        var sample = item && item.sample;
        if (sample) {
          documents.push([id, typeof sample === "string" ? JSON.parse(sample) : sample]);
        }
      });
    }
    return documents;
  }

  class RefreshSampleViews extends foo.Operator {
    get config() {
      return new foo.OperatorConfig({
        name: "refresh_sample_views",
        label: "refseg: refresh sample views",
        description: "Make sample views opened before a labelling run draw the current labels",
        unlisted: true, // triggered by the plugin's runs
      });
    }

    async execute(ctx) {
      if (!supported) {
        console.warn(PLUGIN + ": refresh_sample_views: this FiftyOne App lacks what it needs; reload the page");
        return { refreshed: 0 };
      }
      var wanted = ctx.params && Array.isArray(ctx.params.sample_ids) ? new Set(ctx.params.sample_ids) : null;
      var environment = fos.getCurrentEnvironment();
      var ids = cachedSampleViewIds(environment).filter(function (id) { return !wanted || wanted.has(id); });
      if (!ids.length || !ctx.datasetName) {
        return { refreshed: 0 };
      }
      var documents = await currentDocuments(ctx.datasetName, ctx.view || [], ids);
      if (documents.length) {
        environment.commitUpdate(function (store) {
          documents.forEach(function (entry) {
            var record = store.get(entry[0] + MODAL_SUFFIX);
            if (record) {
              // a JSON string, as FiftyOne's own updates write it (Relay keeps a scalar field as given)
              record.setValue(JSON.stringify(entry[1]), "sample");
            }
          });
        });
        // and the sample views' sidebar counts (what FiftyOne's own useRefreshSample does after an update)
        var index = await ctx.state.snapshot.getPromise(fos.refresher);
        ctx.state.set(fos.refresher, index + 1);
      }
      return { refreshed: documents.length };
    }
  }

  foo.registerOperator(RefreshSampleViews, PLUGIN);
})();
